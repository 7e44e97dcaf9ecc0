"""ipylora/lab/comm.py against a fake comm and the fake session (no kernel)."""

from __future__ import annotations

import math
import threading
import time

import pytest
from fake_session import FakeSession

from ipylora.lab import comm as lab_comm


class FakeComm:
    def __init__(self) -> None:
        self.sent: list[dict] = []
        self.msg_cb = None
        self.close_cb = None
        self.lock = threading.Lock()

    def on_msg(self, cb) -> None:
        self.msg_cb = cb

    def on_close(self, cb) -> None:
        self.close_cb = cb

    def send(self, data) -> None:
        with self.lock:
            self.sent.append(data)

    def receive(self, data) -> None:
        self.msg_cb({"content": {"comm_id": "x", "data": data}})

    def of_type(self, kind: str) -> list[dict]:
        with self.lock:
            return [m for m in self.sent if m["type"] == kind]


class FakeManager:
    def __init__(self) -> None:
        self.targets: dict = {}

    def register_target(self, name, f) -> None:
        self.targets[name] = f

    def unregister_target(self, name, f):
        return self.targets.pop(name)


class FakeShell:
    def __init__(self) -> None:
        self.kernel = type("K", (), {"comm_manager": FakeManager()})()


def open_channel(session: FakeSession) -> FakeComm:
    shell = FakeShell()
    assert lab_comm.register_comm_target(shell, get_session=lambda: session)
    comm = FakeComm()
    shell.kernel.comm_manager.targets["ipylora"](comm, {"content": {"data": {"type": "refresh"}}})
    return comm


def test_no_kernel_is_a_noop():
    class TerminalShell:
        pass

    assert lab_comm.register_comm_target(TerminalShell()) is False


def test_unregister_removes_target():
    shell = FakeShell()
    lab_comm.register_comm_target(shell, get_session=FakeSession)
    lab_comm.unregister_comm_target(shell)
    assert "ipylora" not in shell.kernel.comm_manager.targets


def test_open_sends_state_snapshot():
    session = FakeSession()
    comm = open_channel(session)
    [state] = comm.of_type("state")
    assert state["state"]["model"]["id"] == "ipylora/tiny-llama"
    assert state["state"]["datasets"] == [{"name": "concepts", "rows": 55}]
    assert session.listeners, "the channel listens for changes"


@pytest.mark.parametrize(
    "data, fragment",
    [
        ("stop", "must be an object"),
        ({}, "message.type must be a string"),
        ({"type": 3}, "message.type must be a string"),
        ({"type": "train"}, "unknown message type 'train'"),
        ({"type": "set_adapter"}, "non-empty string 'name'"),
        ({"type": "set_adapter", "name": 7}, "non-empty string 'name'"),
        ({"type": "set_adapter", "name": "x" * 500}, "longer than"),
        ({"type": "refresh", "padding": "x" * 100_000}, "over the 16384-byte limit"),
    ],
)
def test_bad_requests_get_an_error_reply_not_an_exception(data, fragment, caplog):
    session = FakeSession()
    comm = open_channel(session)
    with caplog.at_level("WARNING", logger="ipylora.lab.comm"):
        comm.receive(data)
    assert any("ignored a bad message" in r.getMessage() for r in caplog.records)
    errors = comm.of_type("error")
    assert len(errors) == 1 and fragment in errors[0]["message"], errors
    assert session.calls == []


def test_stop_calls_request_stop_and_pushes_state():
    session = FakeSession()
    comm = open_channel(session)
    comm.receive({"type": "stop"})
    assert session.calls == [("request_stop",)]
    assert len(comm.of_type("state")) == 2


def test_set_adapter_switches_and_bad_name_is_reported():
    session = FakeSession()
    comm = open_channel(session)
    comm.receive({"type": "set_adapter", "name": "sd-prompts"})
    assert session.adapters[0]["active"] is True
    comm.receive({"type": "set_adapter", "name": "nope"})
    [error] = comm.of_type("error")
    assert "No adapter named 'nope'" in error["message"]


def test_unexpected_exception_is_reported_not_raised():
    session = FakeSession()

    def boom():
        raise RuntimeError("disk full")

    session.request_stop = boom
    comm = open_channel(session)
    comm.receive({"type": "stop"})
    [error] = comm.of_type("error")
    assert "stop failed: disk full" in error["message"]


def test_non_finite_losses_become_null():
    session = FakeSession()
    session.run = {"name": "r", "status": "running", "step": 2, "total": 9,
                   "loss": [1.0, math.nan, math.inf], "tokens_per_s": 1.0, "eta_s": None}
    comm = open_channel(session)
    assert comm.of_type("state")[-1]["state"]["run"]["loss"] == [1.0, None, None]


def test_pushes_are_throttled_and_last_state_arrives():
    session = FakeSession()
    comm = open_channel(session)
    session.start_run(total=60, step_s=0.01)  # 60 changes in ~0.6 s
    session.join()
    time.sleep(lab_comm.SidebarChannel(None, None)._interval + 0.1)
    states = comm.of_type("state")
    assert len(states) <= 2 + 0.8 * lab_comm.MAX_PUSHES_PER_S + 2, len(states)
    last = states[-1]["state"]["run"]
    assert last["status"] == "finished" and last["step"] == 60


def test_close_removes_listener_and_stops_pushes():
    session = FakeSession()
    comm = open_channel(session)
    comm.close_cb({})
    assert session.listeners == []
    session.changed()
    assert len(comm.of_type("state")) == 1


def test_session_failure_is_reported():
    shell = FakeShell()

    def broken():
        raise RuntimeError("engine not importable")

    lab_comm.register_comm_target(shell, get_session=broken)
    comm = FakeComm()
    shell.kernel.comm_manager.targets["ipylora"](comm, {})
    [error] = comm.of_type("error")
    assert "engine not importable" in error["message"]
