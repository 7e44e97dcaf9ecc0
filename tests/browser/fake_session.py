"""A stand-in for ``ipylora.engine.Session`` with the sidebar's API only.

Used by the comm unit tests and, inside a real kernel, by the browser test
until the engine's ``%lora_train --background`` exists. ``start_run`` runs a
fake training loop on a thread, calling listeners the way the engine does.
"""

from __future__ import annotations

import math
import threading
import time


class FakeUserError(Exception):
    """Plays ``IpyloraError``: a message for the user, no traceback."""


class FakeSession:
    def __init__(self) -> None:
        self.model = {
            "id": "ipylora/tiny-llama",
            "dtype": "float32",
            "quantization": None,
            "device": "cpu",
            "memory": "2.1 MB",
        }
        self.datasets = [{"name": "concepts", "rows": 55}]
        self.adapters = [{"name": "sd-prompts", "active": False}]
        self.run: dict | None = None
        self.listeners: list = []
        self.stop_requested = threading.Event()
        self.calls: list[tuple] = []
        self._thread: threading.Thread | None = None

    # -- the API ipylora/lab/comm.py relies on ----------------------------
    def snapshot(self) -> dict:
        run = None if self.run is None else dict(self.run, loss=list(self.run["loss"]))
        return {
            "version": "0.0-fake",
            "model": self.model,
            "datasets": list(self.datasets),
            "adapters": [dict(a) for a in self.adapters],
            "run": run,
        }

    def request_stop(self) -> None:
        self.calls.append(("request_stop",))
        self.stop_requested.set()

    def use_adapter(self, name: str) -> None:
        self.calls.append(("use_adapter", name))
        names = [a["name"] for a in self.adapters]
        if name != "base" and name not in names:
            raise FakeUserError(f"No adapter named {name!r}: choose one of base, {', '.join(names)}.")
        for a in self.adapters:
            a["active"] = a["name"] == name
        self.changed()

    def add_listener(self, callback) -> None:
        self.listeners.append(callback)

    def remove_listener(self, callback) -> None:
        self.listeners.remove(callback)

    # -- helpers -----------------------------------------------------------
    def changed(self) -> None:
        for callback in list(self.listeners):
            callback()

    def start_run(self, name: str = "demo", total: int = 400, step_s: float = 0.05) -> None:
        """Fake background training: one step every ``step_s`` until done or stopped."""
        self.stop_requested.clear()
        self.run = {"name": name, "status": "running", "step": 0, "total": total,
                    "loss": [], "tokens_per_s": 0.0, "eta_s": None}

        def loop() -> None:
            for step in range(1, total + 1):
                if self.stop_requested.is_set():
                    self.run["status"] = "stopped"
                    self.changed()
                    return
                time.sleep(step_s)
                self.run["step"] = step
                self.run["loss"] = (self.run["loss"] + [2.5 * math.exp(-step / 60) + 0.1])[-100:]
                self.run["tokens_per_s"] = 1234.0
                self.run["eta_s"] = (total - step) * step_s
                self.changed()
            self.run["status"] = "finished"
            if not any(a["name"] == name for a in self.adapters):
                self.adapters.append({"name": name, "active": False})
            self.changed()

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()

    def join(self, timeout: float = 10) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
