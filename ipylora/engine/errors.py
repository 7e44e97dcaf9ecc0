"""Errors a user can fix.

Every engine error subclasses `IpyloraError` and carries a message that says what happened and
what to do about it. The magic layer shows these as one line, without a traceback; anything else
is a bug and keeps its traceback.
"""


class IpyloraError(Exception):
    """A mistake the user can fix; the message names the problem and the fix."""


class DatasetError(IpyloraError):
    """The data could not be read, parsed or mapped to prompt/response."""


class ModelLoadError(IpyloraError):
    """The base model or tokenizer could not be loaded."""


class ConfigError(IpyloraError):
    """A hyper-parameter or option has a value that cannot work."""


class SessionBusyError(IpyloraError):
    """Another run is using the resident model."""


class UnknownNameError(IpyloraError):
    """A dataset, adapter or run name that the session does not know."""


class OutOfMemoryError(IpyloraError):
    """Training did not fit in memory even after shrinking the micro-batch."""
