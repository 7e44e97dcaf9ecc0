"""`--gpus N` runs that outlive an interruption: the kernel killed mid-run, then `--resume`.

Two torchrun workers (gloo) train the tiny model on CPU, as in test_distributed.py. A user must
never find workers still running after their kernel died, nor lose the steps trained before;
and a resumed run must continue exactly where the uninterrupted one would have been.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from ipylora.engine import DataArgs, TrainArgs
from ipylora.engine.events import StepEnd

from support import CONCEPTS, PROMPT

ROWS = 32  # 4 steps per epoch at batch 8: a resume must restore the data position, not just the weights


@pytest.fixture
def session(fresh_session, concepts):
    fresh_session.add_dataset("c", concepts.head(ROWS), DataArgs(prompt=PROMPT, response="{description}"))
    yield fresh_session
    assert psutil.Process().children(recursive=True) == []


def _losses(events) -> dict[int, float]:
    return {e.step: e.loss for e in events if isinstance(e, StepEnd)}


def _step_ends(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [e for e in map(json.loads, filter(None, lines)) if e["event"] == "StepEnd"]


def test_resume_of_a_gpus_run_follows_the_uninterrupted_trajectory(session):
    straight = []
    session.train("c", TrainArgs(name="straight", steps=12, gpus=2), reporter=straight.append)

    def stop_at_5(event):
        if isinstance(event, StepEnd) and event.step == 5:
            session.request_stop()  # the kernel writes runs/resumed/STOP; rank 0 reads it

    first, second = [], []
    end = session.train("c", TrainArgs(name="resumed", steps=12, gpus=2),
                        reporter=lambda e: (first.append(e), stop_at_5(e)))
    assert end.status == "stopped" and 5 <= end.step < 12, end
    stopped_at = end.step

    end = session.resume("resumed", reporter=second.append)

    assert end.status == "finished" and end.step == 12, end
    assert sorted(_losses(second)) == list(range(stopped_at + 1, 13))  # the panel gets only the new steps
    expected, got = _losses(straight), {**_losses(first), **_losses(second)}
    assert sorted(got) == list(range(1, 13))
    assert max(abs(expected[s] - got[s]) for s in expected) < 1e-5
    run = json.loads(Path("runs/resumed/run.json").read_text())
    assert run["resumed_from"] == stopped_at and run["status"] == "finished" and run["step"] == 12
    assert run["train"]["batch_size"] == 8 and run["train"]["gpus"] == 2  # the global batch, not rank 0's share
    assert [e["step"] for e in _step_ends(Path("runs/resumed"))] == list(range(1, 13))
    assert "resumed" in session.model.peft_config and session.active_adapter == "resumed"


KERNEL = textwrap.dedent("""
    import pandas as pd
    from ipylora.engine import DataArgs, TrainArgs, get_session

    session = get_session()
    session.add_dataset("c", pd.read_csv({concepts!r}).head({rows}),
                        DataArgs(prompt={prompt!r}, response="{{description}}"))
    session.train("c", TrainArgs(name="orphan", steps=2000, gpus=2))
""")


def _alive(processes) -> list:
    """Those still running (a zombie waiting for a reaper has exited)."""
    alive = []
    for proc in processes:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.NoSuchProcess:
            pass
    return alive


def test_workers_save_and_exit_when_their_kernel_is_killed(session, workdir):
    script = workdir / "kernel.py"
    script.write_text(KERNEL.format(concepts=str(CONCEPTS), rows=ROWS, prompt=PROMPT))
    kernel = subprocess.Popen([sys.executable, str(script)], cwd=workdir,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_dir = workdir / "runs" / "orphan"
    deadline = time.time() + 180
    while not _step_ends(run_dir) or _step_ends(run_dir)[-1]["step"] < 2:
        assert kernel.poll() is None, f"the kernel exited with {kernel.returncode} before step 2"
        assert time.time() < deadline, "the run never reached step 2"
        time.sleep(0.05)
    family = psutil.Process(kernel.pid).children(recursive=True)
    assert len(family) >= 3  # torchrun and its two workers

    os.kill(kernel.pid, signal.SIGKILL)
    kernel.wait(10)
    killed_at = time.time()
    deadline = killed_at + 60
    while _alive(family) and time.time() < deadline:
        time.sleep(0.2)

    assert _alive(family) == [], f"still running 60 s after the kernel died: {_alive(family)}"
    run = json.loads((run_dir / "run.json").read_text())
    step = run["step"]
    assert run["status"] == "interrupted" and 2 <= step < 2000, run
    assert "kernel" in run["stop_reason"] and "--resume orphan" in run["stop_reason"]
    # Nothing trained is lost: the adapter and a resumable checkpoint of the last step are on disk.
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
    assert (run_dir / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").exists()
    assert [e["step"] for e in _step_ends(run_dir)] == list(range(1, step + 1))
    assert run["train"]["batch_size"] == 8 and run["train"]["gpus"] == 2
