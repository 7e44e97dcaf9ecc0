"""--report-to: the Trainer's tracker integrations get the losses metrics.jsonl has, offline, across
--resume, and a tracker that is unknown or not installed is refused in one line before anything loads."""

import glob
import importlib.util
import json
import socket
import struct
from pathlib import Path

import pytest

from ipylora.engine import DataArgs, TrainArgs
from ipylora.engine.events import Notice, StepEnd

from support import PROMPT, assert_one_line_error, ipython_shell

LOCAL = ("127.0.0.1", "::1", "localhost")


@pytest.fixture
def offline(monkeypatch):
    """No network and no tracker login: connections to non-local addresses raise, and are listed."""
    attempts = []
    connect, create = socket.socket.connect, socket.create_connection

    def refuse(self, address):
        if isinstance(address, tuple) and address[0] not in LOCAL:
            attempts.append(address)
            raise OSError(f"network blocked by the test: {address}")
        return connect(self, address)

    def create_connection(address, *args, **kwargs):
        if address[0] not in LOCAL:
            attempts.append(address)
            raise OSError(f"network blocked by the test: {address}")
        return create(address, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", create_connection)
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_PROJECT", "WANDB_IDENTITY_TOKEN_FILE",
                 "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "TENSORBOARD_LOGGING_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", "/nonexistent/netrc")  # no saved W&B login either
    return attempts


@pytest.fixture
def session(fresh_session, concepts):
    fresh_session.add_dataset("c", concepts.head(8), DataArgs(prompt=PROMPT, response="{description}"))
    return fresh_session


def wandb_history(folder: Path) -> dict[int, float]:
    """train/loss by train/global_step from the offline runs' .wandb files (W&B's LevelDB-style log of
    protobuf records: 32 KiB blocks, each record split into chunks with a 7-byte header)."""
    from wandb.proto import wandb_internal_pb2

    losses = {}
    for path in sorted(folder.glob("wandb/offline-run-*/run-*.wandb")):
        data = path.read_bytes()
        assert data[:4] == b":W&B", path
        pos, block, chunks = 7, 32768, b""
        while pos + 7 <= len(data):
            if block - pos % block < 7:  # too little room left for a header: the block is padded
                pos += block - pos % block
                continue
            _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if length == 0 and kind == 0:
                break
            chunks += data[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):  # a full record, or the last chunk of one
                record = wandb_internal_pb2.Record()
                record.ParseFromString(chunks)
                chunks = b""
                if record.WhichOneof("record_type") == "history":
                    row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                           for item in record.history.item}
                    if "train/loss" in row:
                        losses[row["train/global_step"]] = row["train/loss"]
    return losses


def test_tensorboard_wandb_mlflow_get_the_losses_offline_and_resume_continues_them(session, offline):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    events = []

    def stop_at_3(event):
        events.append(event)
        if isinstance(event, StepEnd) and event.step == 3:
            session.request_stop()

    args = TrainArgs(name="tracked", steps=6, report_to="tensorboard, wandb,mlflow", samples=("describe a cat",),
                     sample_every=3)
    end = session.train("c", args, reporter=stop_at_3)
    assert end.status == "stopped" and end.step == 4  # step 3 is said while step 4 runs (lagged.py)
    end = session.resume("tracked", reporter=events.append)
    assert end.status == "finished" and end.step == 6

    run_dir = Path("runs/tracked")
    record = json.loads((run_dir / "run.json").read_text())
    assert record["train"]["report_to"] == "tensorboard,wandb,mlflow"  # recorded, and --resume kept it
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {e["step"]: e["loss"] for e in steps if e["event"] == "StepEnd"}
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]

    # TensorBoard: event files in runs/NAME/tb (one per session of the run), train/loss = StepEnd loss.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    board.Reload()
    scalars = {e.step: e.value for e in board.Scalars("train/loss")}
    assert scalars.keys() == losses.keys()
    assert all(scalars[s] == pytest.approx(losses[s], rel=1e-6) for s in losses)  # float32 in the file
    assert [t for t in board.Tags()["tensors"] if t.startswith("samples/")], board.Tags()  # the samples' text

    # W&B: offline, said once per run in a Notice, into runs/NAME/wandb, the same run id after --resume.
    offline_notes = [e.message for e in events if isinstance(e, Notice) and e.message.startswith("W&B is offline")]
    assert len(offline_notes) == 2 and "not logged in" in offline_notes[0] and "wandb sync" in offline_notes[0]
    assert {p.name.rsplit("-", 1)[-1] for p in run_dir.glob("wandb/offline-run-*")} == {record["trackers"]["wandb"]}
    history = wandb_history(run_dir)
    assert history.keys() == losses.keys() and all(history[s] == pytest.approx(losses[s]) for s in losses)
    tables = [json.loads(p.read_text()) for p in run_dir.glob("wandb/offline-run-*/files/media/table/samples_*.json")]
    assert tables and all(row[1] == "describe a cat" for table in tables for row in table["data"])

    # MLflow: a local SQLite store beside the runs (no MLFLOW_TRACKING_URI), one run continued by --resume.
    import mlflow
    from ipylora.engine.trackers import local_mlflow_uri

    assert not mlflow.is_tracking_uri_set()  # the user's MLflow settings are left as they were
    client = mlflow.MlflowClient(local_mlflow_uri(Path("runs")))
    run = client.get_run(record["trackers"]["mlflow"])
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert logged.keys() == losses.keys() and all(logged[s] == pytest.approx(losses[s]) for s in losses)
    assert "samples.json" in [a.path for a in client.list_artifacts(run.info.run_id)]

    # No tracker tried the network. (The Hub client's own telemetry thread, which runs without any
    # tracker too, is not theirs.)
    assert [host for host, *_ in offline if not host.endswith("huggingface.co")] == []


def test_wandb_goes_offline_without_a_network_even_when_logged_in(offline, monkeypatch):
    from ipylora.engine.trackers import wandb_mode

    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode() == ("offline", "no network")
    assert offline and offline[0][0] == "api.wandb.ai"
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the user's own choice wins
    assert wandb_mode()[0] == "disabled"


def test_a_tracker_that_is_not_installed_is_one_line_with_the_pip_command(session, monkeypatch, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    ip = ipython_shell(monkeypatch, session)
    assert_one_line_error(ip, capsys, "%lora_train c --steps 2 --report-to wandb", "--report-to wandb",
                          "pip install wandb")
    assert session.model is None  # refused before the model loads


def test_an_unknown_tracker_is_one_line_listing_the_known_ones(session, monkeypatch, capsys):
    ip = ipython_shell(monkeypatch, session)
    assert_one_line_error(ip, capsys, "%lora_train c --steps 2 --report-to tensorboard,comet", "'comet'",
                          "tensorboard, wandb, mlflow, trackio, none")
    assert session.model is None


def test_report_to_defaults_from_config_and_pyproject(session, monkeypatch, capsys, workdir):
    from ipylora.magics.settings import Lora

    (workdir / "pyproject.toml").write_text('[tool.ipylora]\nreport-to = "tensorboard"\n')
    settings = Lora()
    assert settings.report_to == "none"
    settings.load_project()
    assert settings.report_to == "tensorboard"

    ip = ipython_shell(monkeypatch, session)
    ip.run_line_magic("config", 'Lora.report_to = "nosuch"')
    try:
        assert_one_line_error(ip, capsys, "%lora_train c --steps 2", "--report-to 'nosuch'")
        # A flag on the line wins over %config.
        assert_one_line_error(ip, capsys, "%lora_train c --steps 2 --report-to bogus", "'bogus'")
    finally:
        ip.run_line_magic("config", 'Lora.report_to = "none"')
