"""Shared pieces of the magics: error conversion and front-end choice.

No ML logic lives in the magics. Engine errors (`IpyloraError`) become IPython `UsageError`s,
which Jupyter prints as one line without a traceback; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import functools

from IPython.core.error import UsageError

from ipylora.engine import IpyloraError


def user_errors(method):
    """Show engine errors as one line (UsageError), keeping the session usable."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except IpyloraError as exc:
            raise UsageError(str(exc)) from None

    return wrapper


def in_kernel(shell) -> bool:
    """True in a Jupyter kernel (rich display), False in terminal IPython."""
    return getattr(shell, "kernel", None) is not None
