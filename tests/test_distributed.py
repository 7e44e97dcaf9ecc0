"""`--gpus N` on CPU: two torchrun workers (gloo) train the tiny model outside this process.

Each test goes through the launcher path a notebook uses (Session.train -> torchrun -> worker)
and checks what a user would see: the live panel's curve, the adapter in the resident model,
a one-line error naming the rank, and no process left behind.
"""

import json
import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from ipylora.engine import DataArgs, TrainArgs
from ipylora.engine.distributed import failure_message
from ipylora.engine.events import RunEnd, RunStart, StepEnd

from support import PROMPT

ROWS = 8


@pytest.fixture
def session(fresh_session, concepts):
    fresh_session.add_dataset("c", concepts.head(ROWS), DataArgs(prompt=PROMPT, response="{description}"))
    yield fresh_session
    assert psutil.Process().children(recursive=True) == []  # no worker outlives its run


def _events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_workers_stream_to_the_panel_and_the_adapter_chats(session, concepts):
    from ipylora.ui.live import NotebookReporter

    panel, events = NotebookReporter(), []
    base = session.chat(PROMPT.format(concept=concepts.concept[0]))["text"]

    end = session.train("c", TrainArgs(name="dist", steps=6, gpus=2),
                        reporter=lambda event: (events.append(event), panel(event)))

    assert end.status == "finished" and end.step == 6
    assert panel.curves["steps"] == [1, 2, 3, 4, 5, 6] and panel.curves["loss"][-1] < panel.curves["loss"][0]
    assert [type(e) for e in events][0] is RunStart and isinstance(events[-1], RunEnd)
    assert session.run_state["status"] == "finished" and session.run_state["step"] == 6
    # Rank 0 alone wrote the folder: one start, one end, one adapter.
    kinds = [e["event"] for e in _events(Path("runs/dist"))]
    assert kinds.count("RunStart") == 1 and kinds.count("RunEnd") == 1 and kinds.count("StepEnd") == 6
    assert json.loads(Path("runs/dist/run.json").read_text())["status"] == "finished"
    # The adapter is in the resident model, active, and changes the answer.
    assert "dist" in session.model.peft_config and session.active_adapter == "dist"
    assert session.chat(PROMPT.format(concept=concepts.concept[0]))["text"] != base


def test_a_crashing_worker_ends_the_run_with_one_line_naming_the_rank(session, monkeypatch, capsys):
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.history_manager.enabled = False
    shell.run_line_magic("load_ext", "ipylora")
    monkeypatch.setenv("IPYLORA_TEST_CRASH_AT_STEP", "3")  # rank 1 raises at step 3
    capsys.readouterr()

    shell.run_cell("%lora_train c --name crash --steps 40 --gpus 2", store_history=False)

    captured = capsys.readouterr()
    text = (captured.out + captured.err).strip().splitlines()[-1]
    assert text.startswith("UsageError: Training worker rank 1 failed at step 3: RuntimeError: injected crash"), text
    assert "Traceback" not in captured.out + captured.err and "worker.log" in text
    assert json.loads(Path("runs/crash/run.json").read_text())["status"] == "failed"
    assert not session.training  # the session takes the next command


@pytest.mark.parametrize("how", ["stop-button", "kernel-interrupt"])
def test_stop_reaches_every_rank_and_the_adapter_is_saved_once(session, how):
    if how == "stop-button":  # a background run; the button calls request_stop, as --stop does
        handle = session.train("c", TrainArgs(name="halt", steps=200, gpus=2), background=True)
        deadline = time.time() + 60
        while (session.run_state or {}).get("step", 0) < 2 and time.time() < deadline:
            time.sleep(0.05)
        assert session.request_stop()
        end = handle.join(60)
    else:  # Jupyter's interrupt is a SIGINT to the kernel, which waits in the foreground
        def interrupt(event):
            if isinstance(event, StepEnd) and event.step == 2:
                os.kill(os.getpid(), signal.SIGINT)

        end = session.train("c", TrainArgs(name="halt", steps=200, gpus=2), reporter=interrupt)

    assert end.status == ("stopped" if how == "stop-button" else "interrupted") and 2 <= end.step < 200
    # Both ranks stopped after the same step (otherwise one would wait for the other forever),
    # and the resumable checkpoint is that step's.
    assert Path(f"runs/halt/checkpoints/checkpoint-{end.step}/trainer_state.json").exists()
    kinds = [e["event"] for e in _events(Path("runs/halt"))]
    assert kinds.count("RunEnd") == 1 and kinds.count("StepEnd") == end.step
    assert sorted(p.name for p in Path("runs/halt").iterdir() if "adapter" in p.name) == ["adapter"]
    assert "halt" in session.model.peft_config


def test_a_killed_worker_is_named_from_torchruns_summary(tmp_path):
    (tmp_path / "worker.log").write_text(
        "ipylora.worker FAILED\nRoot Cause (first observed failure):\n[0]:\n  host      : localhost\n"
        "  rank      : 1 (local_rank: 1)\n  exitcode  : -9 (pid: 4242)\n")
    message = failure_message(tmp_path, 1)
    assert message.startswith("Training worker rank 1 killed by SIGKILL (usually the machine running out of memory)")


def _on_two_ranks(tmp_path: Path, body: str) -> list[str]:
    """Run `body` on two torchrun ranks (CPU); each rank's `result` string, by rank.

    Each rank writes its own file: two ranks printing to one pipe can interleave mid-line.
    `body` sees `rank` and `folder` (tmp_path) and sets `result`.
    """
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "ranks.py"
    script.write_text("import sys\nfrom pathlib import Path\nfrom ipylora.engine.distributed import rank as _rank\n"
                      "rank, folder = _rank(), Path(sys.argv[1])\n" + textwrap.dedent(body)
                      + "\nPath(folder, f'rank{rank}').write_text(str(result))\n")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script), str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return [(tmp_path / f"rank{r}").read_text() for r in (0, 1)]


def test_ranks_agree_on_the_least_free_memory_before_any_process_group(tmp_path):
    # The GPU batch plan depends on free memory, and rank 0 shares GPU 0 with the kernel: every
    # rank must plan with the same figure, or their samplers and collectives disagree.
    results = _on_two_ranks(tmp_path, """
        from ipylora.engine.distributed import agree_min
        result = (agree_min('free', 100 + 10 * rank), agree_min('free-2', 5 - rank))
    """)
    assert results == ["(100, 4)", "(100, 4)"]


def test_fsdp_on_cpu_says_it_runs_ddp_and_saves_the_gathered_adapter(session):
    from ipylora.engine.events import Notice

    events = []
    end = session.train("c", TrainArgs(name="sharded", steps=2, gpus=2, strategy="fsdp"), reporter=events.append)
    assert end.status == "finished"
    notices = [e.message for e in events if isinstance(e, Notice)]
    assert any("CPU ranks train with DDP" in text for text in notices), notices
    # Saved from the state every rank gathered (the path FSDP needs), and loaded here.
    assert Path("runs/sharded/adapter/adapter_model.safetensors").exists() and "sharded" in session.model.peft_config


def test_ranks_agree_on_why_they_stop(tmp_path):
    # Rank 1's watchdog may see the kernel die a moment before rank 0 reads a Stop: all ranks, and
    # so run.json, must say the same thing (a kill outranks a Stop request).
    (tmp_path / "STOP").write_text("stopped")
    results = _on_two_ranks(tmp_path, """
        import torch.distributed as dist
        from ipylora.engine.distributed import agree_to_stop
        from ipylora.engine.train import StopFlag
        dist.init_process_group('gloo')
        flag = StopFlag()
        if rank == 1:
            flag.set('interrupted')
        result = f'{agree_to_stop(flag, folder)} {flag.reason}'
        dist.destroy_process_group()
    """)
    assert results == ["True interrupted", "True interrupted"]
