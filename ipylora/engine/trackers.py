"""Experiment trackers (--report-to): the Trainer's own integrations, kept local when they can be.

For each tracker named in `report_to` the Trainer's callback logs the scalars (train/loss,
train/learning_rate, eval/loss, ...). This module only decides where they go, before the trainer
is built, and adds what the Trainer does not log, the samples' text:

- tensorboard: event files in runs/NAME/tb (the callback's TENSORBOARD_LOGGING_DIR), samples as text;
- wandb: a run we open ourselves in runs/NAME/wandb, offline (WANDB_MODE=offline) when there is no
  login or no network, so a kernel without either still trains; samples as a Table; its id is
  kept in run.json so --resume continues the same run;
- mlflow: MLFLOW_TRACKING_URI when set, else a local SQLite store beside the runs (runs/mlflow.db,
  artifacts in runs/mlartifacts: MLflow 3 refuses its old file store); samples as a table;
- trackio: local by design (its own folder), scalars only.

W&B and MLflow runs are opened here rather than by the callbacks (which use an active run when
there is one) so that they are closed when our run ends: the W&B callback never finishes its run,
and a kernel trains many runs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from ipylora.engine.events import Event, Notice, Sample


@dataclass(frozen=True)
class Tracker:
    module: str
    """The package's import name (checked before the model loads)."""
    pip: str
    """What to pip install."""


TRACKERS = {
    "tensorboard": Tracker("tensorboard", "tensorboard"),
    "wandb": Tracker("wandb", "wandb"),
    "mlflow": Tracker("mlflow", "mlflow"),
    "trackio": Tracker("trackio", "trackio"),
}
SAMPLE_COLUMNS = ["step", "prompt", "answer", "reward"]
PROJECT = "ipylora"
"""The W&B project / MLflow experiment / Trackio project, unless WANDB_PROJECT or MLFLOW_EXPERIMENT_NAME say otherwise."""


def names(report_to: str | None) -> tuple[str, ...]:
    """The trackers in a --report-to value ("tensorboard,wandb"), in order, without "none"."""
    found = []
    for name in (report_to or "").split(","):
        name = name.strip().lower()
        if name and name != "none" and name not in found:
            found.append(name)
    return tuple(found)


def problems(report_to: str | None) -> list[str]:
    """What is wrong with a --report-to value: unknown names, trackers that are not installed."""
    found = []
    for name in names(report_to):
        tracker = TRACKERS.get(name)
        if tracker is None:
            found.append(f"--report-to {name!r} is not one of {', '.join(TRACKERS)}, none")
        elif importlib.util.find_spec(tracker.module) is None:
            found.append(f"--report-to {name} needs the {tracker.pip} package, which is not installed: "
                         f"pip install {tracker.pip} (or pip install 'ipylora[trackers]' for all of them)")
    return found


def normalized(report_to: str | None) -> str:
    return ",".join(names(report_to)) or "none"


def trainer_settings(report_to: str | None, run_name: str | None) -> dict:
    """TrainingArguments keywords for --report-to (every rank gets them; the Trainer logs from rank 0)."""
    chosen = names(report_to)
    if not chosen:
        return {"report_to": "none"}
    settings = {"report_to": list(chosen), "run_name": run_name}
    if "trackio" in chosen:
        settings["project"] = PROJECT
    return settings


class Trackers:
    """One run's trackers: settings for the Trainer, runs we open and close, samples we add."""

    def __init__(self, report_to: str, run_dir: Path, name: str, record: dict, emit, main: bool = True):
        self.names = names(report_to) if main else ()  # under torchrun the Trainer reports from rank 0
        self.run_dir, self.name, self.record, self.emit = Path(run_dir), name, record, emit
        self.ids: dict = dict(record.get("trackers") or {})
        self.samples: list[list] = []  # [step, prompt, answer, reward] rows for the W&B / MLflow tables
        self.tensorboard = None  # the Trainer's TensorBoardCallback, once attached
        self.wandb_run = None
        self.mlflow = None
        self._mlflow_uri = None  # the tracking URI before ours, restored on close

    @contextlib.contextmanager
    def building(self):
        """While the trainer is built: the TensorBoard callback reads its folder when it is created."""
        if "tensorboard" not in self.names or os.environ.get("TENSORBOARD_LOGGING_DIR"):
            yield
            return
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(self.run_dir / "tb")
        try:
            yield
        finally:
            os.environ.pop("TENSORBOARD_LOGGING_DIR", None)

    def open(self, config: dict) -> None:
        """Start (or, resuming, continue) the W&B and MLflow runs; record their ids in run.json."""
        if "wandb" in self.names:
            self._open_wandb(config)
        if "mlflow" in self.names:
            self._open_mlflow()
        if self.ids:
            self.record["trackers"] = dict(self.ids)

    def attach(self, trainer) -> None:
        if "tensorboard" in self.names:
            from transformers.integrations import TensorBoardCallback

            self.tensorboard = next((c for c in trainer.callback_handler.callbacks
                                     if isinstance(c, TensorBoardCallback)), None)

    def __call__(self, event: Event) -> None:
        if not self.names or not isinstance(event, Sample):
            return
        self.samples.append([event.step, event.prompt, event.text, event.reward])
        writer = getattr(self.tensorboard, "tb_writer", None)
        if writer is not None:
            prompts = list(dict.fromkeys(row[1] for row in self.samples))
            writer.add_text(f"samples/{prompts.index(event.prompt) + 1}", f"**{event.prompt}**\n\n{event.text}",
                            event.step)
            writer.flush()

    def close(self, status: str, step: int) -> None:
        """Log the samples table and end the W&B / MLflow runs (`status`: the run's). A tracker that
        fails here says so in a Notice: the adapter is saved already and the run's result stands."""
        for tracker, closing in (("W&B", self._close_wandb), ("MLflow", self._close_mlflow)):
            try:
                closing(status, step)
            except Exception as exc:  # noqa: BLE001 - reported, and the run's own outcome wins
                self.emit(Notice(f"{tracker} could not finish the run: {type(exc).__name__}: {exc}"))

    def _close_wandb(self, status: str, step: int) -> None:
        run, self.wandb_run = self.wandb_run, None
        if run is None:
            return
        import wandb

        if self.samples:
            run.log({"samples": wandb.Table(columns=SAMPLE_COLUMNS, data=self.samples), "train/global_step": step})
        run.finish(exit_code=1 if status in ("failed", "oom") else 0)

    def _close_mlflow(self, status: str, step: int) -> None:
        mlflow, self.mlflow = self.mlflow, None
        if mlflow is None:
            return
        try:
            if self.samples:
                mlflow.log_table({c: [row[i] for row in self.samples] for i, c in enumerate(SAMPLE_COLUMNS)},
                                 artifact_file="samples.json")
            mlflow.end_run(status="FINISHED" if status == "finished" else
                           "FAILED" if status in ("failed", "oom") else "KILLED")
        finally:
            if self._mlflow_uri is not False:
                mlflow.set_tracking_uri(self._mlflow_uri)

    # -- W&B ------------------------------------------------------------------------------------
    def _open_wandb(self, config: dict) -> None:
        import wandb

        mode, why = wandb_mode()
        folder = self.run_dir
        if mode == "offline":
            self.emit(Notice(f"W&B is offline ({why}): the run is saved in {folder / 'wandb'}; "
                             f"`wandb sync {folder / 'wandb'}` uploads it later."))
        self.ids.setdefault("wandb", secrets.token_hex(4))  # W&B's own ids are 8 lowercase letters/digits
        self.wandb_run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", PROJECT), name=self.name, id=self.ids["wandb"], resume="allow",
            dir=str(folder), mode=mode, config=config, reinit="finish_previous",  # the callback logs to wandb.run
            # The engine never prints: W&B's banner and console capture would land in a random cell.
            settings=wandb.Settings(silent=True, show_warnings=False, console="off", disable_git=True),
        )

    # -- MLflow ---------------------------------------------------------------------------------
    def _open_mlflow(self) -> None:
        import mlflow

        self._mlflow_uri = False  # False: the tracking URI is the user's, leave it
        if not os.environ.get("MLFLOW_TRACKING_URI") and not mlflow.is_tracking_uri_set():
            self._mlflow_uri = None
            mlflow.set_tracking_uri(local_mlflow_uri(self.run_dir.parent))
            # Creating the local store logs its table setup at INFO: noise in the cell that trains.
            logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
        self.mlflow = mlflow
        if self.ids.get("mlflow"):
            mlflow.start_run(run_id=self.ids["mlflow"])
            return
        experiment_name = os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT)
        experiment = mlflow.get_experiment_by_name(experiment_name)
        if experiment is None:
            artifacts = None if self._mlflow_uri is False else (self.run_dir.parent / "mlartifacts").resolve().as_uri()
            experiment_id = mlflow.create_experiment(experiment_name, artifact_location=artifacts)
        else:
            experiment_id = experiment.experiment_id
        self.ids["mlflow"] = mlflow.start_run(experiment_id=experiment_id, run_name=self.name).info.run_id


def local_mlflow_uri(runs: Path) -> str:
    """The MLflow store used when MLFLOW_TRACKING_URI is not set: runs/mlflow.db."""
    return f"sqlite:///{(Path(runs) / 'mlflow.db').resolve()}"


def wandb_mode() -> tuple[str, str]:
    """("online" | "offline" | whatever WANDB_MODE says, why): offline without a login or a network."""
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode, "WANDB_MODE" if mode == "offline" else ""
    if not _wandb_logged_in():
        return "offline", "not logged in: run `wandb login` to upload runs"
    if not _reachable(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")):
        return "offline", "no network"
    return "online", ""


def _wandb_logged_in() -> bool:
    import netrc
    from urllib.parse import urlparse

    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _reachable(url: str, timeout: float = 3.0) -> bool:
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(url)
    try:
        socket.create_connection((parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)),
                                 timeout=timeout).close()
        return True
    except OSError:
        return False
