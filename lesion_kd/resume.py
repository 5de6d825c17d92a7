"""``lesion-kd fit ... --ckpt_path last``: continue the latest run under the same root, in its own directory.

Lightning's own ``ckpt_path="last"`` looks in the *new* run's checkpoint directory (a fresh
``version_N``), finds nothing and starts from scratch. Here ``last`` means the most recent
``<root>/lightning_logs/version_*/checkpoints/last.ckpt``; the resumed run logs into that same version
directory (its checkpoints, best-model tracking and ``metrics.csv`` continue), and the CSV rows logged after
the checkpoint was written (by the run that was then killed) are dropped, since they are logged again.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from .callbacks import SecretSafeCSVLogger
from .data.io import atomic_write_bytes


def find_last_checkpoint(root: str | os.PathLike, dirpath: str | os.PathLike | None = None) -> Path | None:
    """The most recently written ``last.ckpt`` of the runs under ``root`` (or in ``dirpath`` if given)."""
    if dirpath is not None:
        path = Path(dirpath) / "last.ckpt"
        return path if path.is_file() else None
    found = sorted(Path(root).glob("lightning_logs/version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def checkpoint_step(path: str | os.PathLike) -> int:
    """The optimiser step a checkpoint was written at (read without unpickling code)."""
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])


def trim_metrics_csv(path: Path, max_step: int) -> list[str]:
    """Drop the rows logged after ``max_step`` (atomically); returns the header."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        rows = [r for r in reader if not r.get("step") or int(float(r["step"])) <= max_step]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())
    return header


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:  # resuming: keep the rows logged before the checkpoint
        pass


class ResumedCSVLogger(SecretSafeCSVLogger):
    """A CSVLogger that continues an existing ``metrics.csv`` (rows after ``resume_step`` dropped)."""

    def __init__(self, *args, resume_step: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.resume_step = resume_step

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            header = trim_metrics_csv(Path(self.log_dir) / ExperimentWriter.NAME_METRICS_FILE, self.resume_step)
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
            self._experiment.metrics_keys = header
        return self._experiment


def resume_in_place(trainer, ckpt: Path) -> bool:
    """Make ``trainer`` log and checkpoint into the run directory ``ckpt`` belongs to (True if it does)."""
    run_dir = ckpt.parent.parent
    if not run_dir.name.startswith("version_"):
        return False  # a checkpoint outside the usual layout: resume it, but log into a new run directory
    version = run_dir.name.removeprefix("version_")
    step = checkpoint_step(ckpt)
    loggers = []
    for lg in trainer.loggers:
        if isinstance(lg, CSVLogger) and not isinstance(lg, ResumedCSVLogger) and Path(lg.root_dir) == run_dir.parent:
            lg = ResumedCSVLogger(lg.save_dir, name=lg.name, version=int(version) if version.isdigit() else version,
                                  resume_step=step)
        loggers.append(lg)
    trainer.loggers = loggers
    return True
