"""Kernel side of the JupyterLab sidebar: the ``ipylora`` comm target.

The sidebar opens a comm to the target ``"ipylora"``; each open comm gets a
:class:`SidebarChannel` that

* sends the session snapshot as ``{"type": "state", "state": ...}`` when the
  comm opens and whenever the session says it changed (throttled to at most
  ``MAX_PUSHES_PER_S`` messages a second, trailing edge always sent, so the
  final step of a run is never lost);
* validates every message from the frontend (``refresh``, ``stop``,
  ``set_adapter``) and answers anything else with
  ``{"type": "error", "message": ...}``. A handler never raises: an exception
  inside a comm callback only reaches the kernel log, where nobody looks.

The session listener may be called from the training thread. Sending on a
comm from another thread is safe in ipykernel (IOPub goes through its own
thread); the snapshot is taken by the session and only read here.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from typing import Any, Callable

TARGET_NAME = "ipylora"
MAX_PUSHES_PER_S = 4.0
_MAX_NAME_LEN = 200
_MAX_MESSAGE_BYTES = 16 * 1024  # every valid request is a few dozen bytes

log = logging.getLogger(__name__)

SessionGetter = Callable[[], Any]


def _default_session() -> Any:
    from ipylora.engine import get_session  # lazy: the engine imports lazily too

    return get_session()


def register_comm_target(shell: Any, get_session: SessionGetter | None = None) -> bool:
    """Register the ``ipylora`` comm target on the shell's kernel.

    Called by ``%load_ext ipylora``. Returns False (and does nothing) when
    there is no kernel, e.g. in terminal IPython. Registering again replaces
    the previous handler, so reloading the extension is harmless.
    ``get_session`` is for tests; it defaults to ``ipylora.engine.get_session``.
    """
    kernel = getattr(shell, "kernel", None)
    manager = getattr(kernel, "comm_manager", None)
    if manager is None:
        return False
    getter = get_session or _default_session

    def on_open(comm: Any, open_msg: dict) -> None:
        SidebarChannel(comm, getter).start(open_msg)

    manager.register_target(TARGET_NAME, on_open)
    return True


def unregister_comm_target(shell: Any) -> None:
    """Undo :func:`register_comm_target` (``%unload_ext ipylora``)."""
    manager = getattr(getattr(shell, "kernel", None), "comm_manager", None)
    if manager is not None:
        manager.unregister_target(TARGET_NAME, None)


class MessageError(ValueError):
    """A frontend message that does not follow the comm contract."""


def parse_request(data: Any) -> dict:
    """Validate one frontend message; raises :class:`MessageError` naming the problem."""
    if not isinstance(data, dict):
        raise MessageError(f"message must be an object, got {type(data).__name__}")
    try:
        size = len(json.dumps(data))
    except (TypeError, ValueError):
        raise MessageError("message is not plain JSON") from None
    if size > _MAX_MESSAGE_BYTES:
        raise MessageError(f"message of {size} bytes is over the {_MAX_MESSAGE_BYTES}-byte limit")
    kind = data.get("type")
    if not isinstance(kind, str):
        raise MessageError("message.type must be a string")
    if kind in ("refresh", "stop"):
        return {"type": kind}
    if kind == "set_adapter":
        name = data.get("name")
        if not isinstance(name, str) or not name.strip():
            raise MessageError("set_adapter needs a non-empty string 'name'")
        if len(name) > _MAX_NAME_LEN:
            raise MessageError(f"adapter name longer than {_MAX_NAME_LEN} characters")
        return {"type": kind, "name": name}
    raise MessageError(f"unknown message type {kind[:40]!r}; expected refresh, stop or set_adapter")


def jsonable(value: Any) -> Any:
    """Deep copy of a snapshot that JSON can carry: NaN/inf losses become None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


class SidebarChannel:
    """One open sidebar comm: pushes state, handles requests."""

    def __init__(self, comm: Any, get_session: SessionGetter, clock: Callable[[], float] = time.monotonic):
        self._comm = comm
        self._get_session = get_session
        self._clock = clock
        self._interval = 1.0 / MAX_PUSHES_PER_S
        self._lock = threading.Lock()
        self._last_push = -math.inf
        self._timer: threading.Timer | None = None
        self._closed = False
        self._session: Any = None

    def start(self, open_msg: dict | None = None) -> None:
        self._comm.on_msg(self._on_msg)
        self._comm.on_close(self._on_close)
        try:
            self._session = self._get_session()
            self._session.add_listener(self.on_change)
        except Exception as exc:  # noqa: BLE001 - reported to the sidebar instead
            log.exception("ipylora sidebar: no session")
            self._send({"type": "error", "message": f"ipylora session unavailable: {exc}"})
            return
        self.push()

    # -- kernel -> frontend ------------------------------------------------

    def on_change(self) -> None:
        """Session listener; may run on the training thread. Throttled push."""
        with self._lock:
            if self._closed or self._timer is not None:
                return  # a trailing push is already scheduled
            wait = self._last_push + self._interval - self._clock()
            if wait > 0:
                self._timer = threading.Timer(wait, self._flush)
                self._timer.daemon = True
                self._timer.start()
                return
        self.push()

    def _flush(self) -> None:
        with self._lock:
            self._timer = None
        self.push()

    def push(self) -> None:
        """Send the current snapshot now."""
        if self._closed or self._session is None:
            return
        with self._lock:
            self._last_push = self._clock()
        try:
            state = jsonable(self._session.snapshot())
        except Exception as exc:  # noqa: BLE001
            log.exception("ipylora sidebar: snapshot failed")
            self._send({"type": "error", "message": f"Could not read the ipylora session: {exc}"})
            return
        self._send({"type": "state", "state": state})

    def _send(self, data: dict) -> None:
        if self._closed:
            return
        try:
            self._comm.send(data)
        except Exception:  # noqa: BLE001 - a dead frontend must not break training
            log.exception("ipylora sidebar: send failed")

    # -- frontend -> kernel ------------------------------------------------

    def _on_msg(self, msg: dict) -> None:
        try:
            data = msg.get("content", {}).get("data")
            request = parse_request(data)
        except Exception as exc:  # noqa: BLE001 - MessageError, or a malformed envelope
            log.warning("ipylora sidebar: ignored a bad message: %s", exc)
            self._send({"type": "error", "message": f"Bad sidebar request: {exc}"})
            return
        try:
            self._handle(request)
        except Exception as exc:  # noqa: BLE001 - shown in the sidebar, never raised
            message = str(exc) or type(exc).__name__
            if not _is_user_error(exc):
                log.exception("ipylora sidebar: %s failed", request["type"])
                message = f"{request['type']} failed: {message}"
            self._send({"type": "error", "message": message})
        self.push()

    def _handle(self, request: dict) -> None:
        if self._session is None:
            raise RuntimeError("no ipylora session")
        if request["type"] == "stop":
            self._session.request_stop()
        elif request["type"] == "set_adapter":
            self._session.use_adapter(request["name"])
        # "refresh": the push after every request is the answer

    def _on_close(self, _msg: dict | None = None) -> None:
        with self._lock:
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        if self._session is not None:
            try:
                self._session.remove_listener(self.on_change)
            except Exception:  # noqa: BLE001
                log.exception("ipylora sidebar: remove_listener failed")


def _is_user_error(exc: BaseException) -> bool:
    try:
        from ipylora.engine.errors import IpyloraError
    except ImportError:
        return False
    return isinstance(exc, IpyloraError)
