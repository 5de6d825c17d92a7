"""Lightning callbacks and W&B helpers of the ``lesion-kd`` command.

- ``WandbPredictionImages``: a few fixed validation images with ground-truth and predicted masks, logged to
  W&B at every validation epoch end (rank 0 only), so that one can watch the predictions improve;
- ``ProgressLines``: a line per validation and every few minutes (step, time left, loss, val Dice) where the
  progress bar is off, e.g. in the log file of a ``reproduce-table`` cell;
- ``ProgressFile``: the same figures in a small JSON file ($LESION_KD_PROGRESS_FILE), from which ``lesion-kd
  sweep`` draws each run's progress bar;
- ``TrainIdsRecorder``: an opt-in record of the training image ids each process saw
  (``train_ids_rank{r}.json`` in the run directory), to check data sharding under DDP;
- ``redact_secrets``, ``SecretSafeWandbLogger``, ``argv_has_secret``: no secret-looking value (an API key, a
  token, the value of ``WANDB_API_KEY``) is ever written to W&B, neither in the run config, nor in the
  hyperparameters Lightning logs, nor in the command line W&B records with the run's metadata.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

# Names of config keys / environment variables whose values must never reach a logger or a file we write.
SECRET_NAME = re.compile(r"(api[_-]?key|token|secret|passw(or)?d|credential|private[_-]?key|auth|_key$)", re.IGNORECASE)
# user[:password]@ in a URL (https://user:pass@host/..., s3://KEY@bucket): the credentials are cut, the rest kept
URL_CREDENTIALS = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")
REDACTED = "<redacted>"
CLASS_LABELS = {0: "background", 1: "lesion"}


def _secret_env_values() -> set[str]:
    """Values of the environment variables named like secrets (WANDB_API_KEY, HF_TOKEN, AWS_ACCESS_KEY, ...)."""
    # short values ("1", "true") are flags, not secrets: replacing them everywhere would garble the config
    return {v for k, v in os.environ.items() if SECRET_NAME.search(k) and len(v) >= 8}


def redact_secrets(obj: Any, _secrets: set[str] | None = None) -> Any:
    """``obj`` (nested dicts/lists/tuples of plain values) with secret-looking values replaced.

    - a value whose key is named like a secret (``api_key``, ``token``, ``password``, ...) becomes ``<redacted>``;
    - a string containing the value of such an environment variable (``WANDB_API_KEY``, ``*_KEY``, ``*TOKEN*``)
      becomes ``<redacted>``;
    - credentials in a URL are cut, the rest kept: ``https://user:pw@host/x`` -> ``https://<redacted>@host/x``.

    Redacting is idempotent (a redacted value redacts to itself), so a config read back from a file we wrote
    compares equal to the live one after both are redacted (``lightning_cli.changed_hparams``). What holds no
    secret is returned as the very same object (types kept).
    """
    secrets = _secret_env_values() if _secrets is None else _secrets
    if isinstance(obj, dict):
        out = {k: REDACTED if isinstance(k, str) and SECRET_NAME.search(k) and obj[k] not in (None, "", REDACTED)
               else redact_secrets(v, secrets) for k, v in obj.items()}
        return obj if all(out[k] is obj[k] for k in obj) else out
    if isinstance(obj, (list, tuple)):
        items = [redact_secrets(v, secrets) for v in obj]
        if all(a is b for a, b in zip(items, obj, strict=True)):
            return obj
        return type(obj)(items) if type(obj) in (list, tuple) else items
    if isinstance(obj, str):
        if any(s in obj for s in secrets):
            return REDACTED
        cut = URL_CREDENTIALS.sub(lambda m: f"{m.group(1)}{REDACTED}@", obj)
        return obj if cut == obj else cut
    return obj


def argv_has_secret(argv: list[str]) -> bool:
    """Whether a command line holds a secret-looking value (W&B would record it with the run's metadata)."""
    secrets = _secret_env_values()
    for i, tok in enumerate(argv):
        if any(v in tok for v in secrets) or URL_CREDENTIALS.search(tok):
            return True
        opt = tok.split("=", 1)[0]
        if opt.startswith("-") and SECRET_NAME.search(opt) and ("=" in tok or i + 1 < len(argv)):
            return True
    return False


def secret_safe_wandb_logger(**kwargs: Any):
    """A ``WandbLogger`` (same arguments) that redacts secret-looking hyperparameters before logging them.

    Lightning logs the model's and data module's hyperparameters itself (flat keys); they pass through
    ``redact_secrets`` too. When the command line holds a secret, W&B's system metadata (which records the
    command line) is switched off for the run.
    """
    from lightning.pytorch.loggers import WandbLogger

    class SecretSafeWandbLogger(WandbLogger):
        def log_hyperparams(self, params: Any) -> None:
            from lightning.fabric.utilities.logger import _convert_params

            super().log_hyperparams(redact_secrets(_convert_params(params)))

    if argv_has_secret(sys.argv[1:]):
        import wandb

        kwargs["settings"] = wandb.Settings(x_disable_meta=True)
    return SecretSafeWandbLogger(**kwargs)


class SecretSafeCSVLogger(CSVLogger):
    """``CSVLogger`` whose ``hparams.yaml`` holds redacted values (``redact_secrets``)."""

    def log_hyperparams(self, params: Any = None) -> None:
        from lightning.fabric.utilities.logger import _convert_params

        super().log_hyperparams(redact_secrets(_convert_params(params)))


class RunRecord(Callback):
    """Every checkpoint carries the options that make a run this run, and no secret.

    - ``checkpoint["lesion_kd_run"]``: the seed, data and budget options (``lightning_cli.run_options``), which
      ``--ckpt_path`` compares with the resuming command's before training (another run is refused);
    - the model's and data module's hyperparameters Lightning dumps into the checkpoint pass through
      ``redact_secrets``, as ``config.yaml`` and ``hparams.yaml`` do.
    """

    KEY = "lesion_kd_run"

    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[self.KEY] = self.options
        for key in ("hyper_parameters", "datamodule_hyper_parameters"):
            if key in checkpoint:
                checkpoint[key] = redact_secrets(checkpoint[key])


def find_wandb_logger(trainer: L.Trainer):
    """The trainer's WandbLogger, or None."""
    from lightning.pytorch.loggers import WandbLogger

    return next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)


class WandbPredictionImages(Callback):
    """Log the first ``num_images`` validation images with mask overlays to W&B at each validation epoch end.

    The images are always the same (the first ids of the validation split), so successive epochs show how
    the prediction on one image evolves. Each is a ``wandb.Image`` of the model-size input with two masks,
    ``prediction`` and ``ground_truth`` (class labels background/lesion), under the key ``val/predictions``.
    Runs on rank 0 only (a few forward passes outside the distributed validation loop); does nothing when
    no WandbLogger is attached.

    Args:
        num_images: how many validation images to log.
    """

    def __init__(self, num_images: int = 4) -> None:
        if num_images < 0:
            raise ValueError(f"--wandb_num_images={num_images}: must be >= 0")
        self.num_images = num_images

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.num_images or trainer.sanity_checking or not trainer.is_global_zero:
            return
        logger = find_wandb_logger(trainer)
        if logger is None:
            return
        loader = trainer.val_dataloaders
        if isinstance(loader, (list, tuple)):
            loader = loader[0] if loader else None
        dataset = getattr(loader, "dataset", None)
        if dataset is None:
            warnings.warn("W&B prediction images: no validation dataset to draw images from; skipped", stacklevel=2)
            return
        items = [dataset[i] for i in range(min(self.num_images, len(dataset)))]
        if not items or "mask" not in items[0]:
            return
        x = torch.stack([it["image"] for it in items]).to(pl_module.device)
        # the plain module, not the DDP wrapper: only rank 0 runs this forward, no collective may happen
        with torch.no_grad(), trainer.precision_plugin.val_step_context():
            logits = pl_module(trainer.precision_plugin.convert_input(x))
        preds = logits.float().argmax(1).cpu().numpy().astype(np.uint8)
        images, masks, captions = [], [], []
        for it, pred in zip(items, preds, strict=True):
            img = (it["image"].permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)
            images.append(img)
            masks.append({
                "prediction": {"mask_data": pred, "class_labels": CLASS_LABELS},
                "ground_truth": {"mask_data": it["mask"].numpy().astype(np.uint8), "class_labels": CLASS_LABELS},
            })
            captions.append(str(it.get("id", "")))
        logger.log_image(key="val/predictions", images=images, step=trainer.global_step, masks=masks, caption=captions)


class TrainIdsRecorder(Callback):
    """Record the ids of the labeled and unlabeled training images each process saw.

    Writes ``train_ids_rank{r}.json`` (``{"rank", "world_size", "labeled": [...], "unlabeled": [...]}``, ids in
    the order seen, repeats kept) into the run directory at the end of training. Enabled by
    ``--record_train_ids true``; meant for checking that DDP shards both training streams.
    """

    def __init__(self) -> None:
        self.seen: dict[str, list[str]] = {"labeled": [], "unlabeled": []}
        self.run_dir: Path | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # trainer.log_dir broadcasts from rank 0 (a collective), so every rank asks here, at the same point
        self.run_dir = Path(trainer.log_dir or trainer.default_root_dir)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        for stream in ("labeled", "unlabeled"):
            part = batch.get(stream) if isinstance(batch, dict) else None
            if part is not None and "id" in part:
                self.seen[stream] += [str(i) for i in part["id"]]

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.run_dir is None:
            return
        doc = {"rank": trainer.global_rank, "world_size": trainer.world_size, **self.seen}
        from .io_utils import atomic_write_text

        path = self.run_dir / f"train_ids_rank{trainer.global_rank}.json"
        atomic_write_text(path, json.dumps(doc, indent=1) + "\n")


class WandbRunId(Callback):
    """Keep the W&B run id in ``<run>/wandb_id.txt``, so that ``--ckpt_path last`` continues the same W&B run."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from .data.io import atomic_write_bytes

        logger = find_wandb_logger(trainer)
        if logger is not None and trainer.is_global_zero and trainer.log_dir:
            atomic_write_bytes(Path(trainer.log_dir) / "wandb_id.txt", f"{logger.version}\n".encode())


class ProgressLines(Callback):
    """Where the progress bar is off (``--trainer.enable_progress_bar false``, as ``reproduce-table`` runs its
    cells, whose output goes to a log file), one line per validation and one every ``minutes`` of training:
    step / total, elapsed minutes, the time left at this pace, the last training loss and validation Dice.
    Rank 0 only."""

    def __init__(self, minutes: float = 5.0) -> None:
        self.minutes = minutes
        self._t0 = self._last = 0.0
        self._step0 = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = self._last = time.monotonic()
        self._step0 = trainer.global_step  # a resumed run: its pace counts from here

    def line(self, trainer: L.Trainer, what: str) -> str | None:
        if not trainer.is_global_zero:
            return None
        step, total = trainer.global_step, trainer.max_steps
        if total is None or total < 0:
            total = int(trainer.estimated_stepping_batches)
        elapsed = time.monotonic() - self._t0
        done = step - self._step0
        left = f", about {(total - step) * elapsed / done / 60:.0f} min left" if done > 0 and elapsed > 0 else ""
        text = f"[{what}] step {step}/{total} ({100 * step / max(total, 1):.0f}%), {elapsed / 60:.1f} min{left}"
        metrics = trainer.callback_metrics
        for key, label in (("train/loss", "loss"), ("val/dice", "val Dice")):
            if key in metrics:
                text += f", {label} {float(metrics[key]):.4f}"
        print(text, flush=True)
        return text

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last >= 60 * self.minutes:
            self._last = now
            self.line(trainer, "train")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self.line(trainer, "val")


PROGRESS_FILE_ENV = "LESION_KD_PROGRESS_FILE"


class ProgressFile(Callback):
    """The run's progress as a small JSON file, rewritten at most every ``seconds`` and at each change of stage:
    ``{"stage": "train"|"trained"|"test"|"tested", "step", "total", "loss", "val_dice", "time"}``. ``lesion-kd
    sweep`` names the file in $LESION_KD_PROGRESS_FILE for each run it starts and draws that run's progress bar
    from it (the run's own output goes to its log file). Rank 0 only; replaced atomically, never fsynced."""

    def __init__(self, path: str | os.PathLike, seconds: float = 2.0) -> None:
        self.path, self.seconds = Path(path), seconds
        self._last = float("-inf")

    def write(self, trainer: L.Trainer, stage: str) -> dict | None:
        if not trainer.is_global_zero:
            return None
        total = trainer.max_steps
        if total is None or total < 0:
            total = int(trainer.estimated_stepping_batches)
        metrics = trainer.callback_metrics
        doc = {"stage": stage, "step": int(trainer.global_step), "total": int(total), "time": time.time()}
        for key, name in (("train/loss", "loss"), ("val/dice", "val_dice")):
            if key in metrics:
                doc[name] = float(metrics[key])
        tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(doc))
            os.replace(tmp, self.path)
        except OSError:
            return None  # progress is a courtesy: never the reason a run fails
        self._last = time.monotonic()
        return doc

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.write(trainer, "train")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if time.monotonic() - self._last >= self.seconds:
            self.write(trainer, "train")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self.write(trainer, "train")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.write(trainer, "trained")

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.write(trainer, "test")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.write(trainer, "tested")


class CheckpointOnSigterm(Callback):
    """Save ``last.ckpt`` when the run is stopped by SIGTERM (what SLURM sends before preemption).

    Lightning turns SIGTERM into a ``SIGTERMException`` after the current batch, so the loop state is
    consistent; this writes the checkpoint that ``--ckpt_path <run>/checkpoints/last.ckpt`` resumes from.
    """

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if not isinstance(exception, SIGTERMException) or trainer.state.fn != "fit":
            return
        ckpt_cb = trainer.checkpoint_callback
        if isinstance(ckpt_cb, LesionCheckpoint):
            ckpt_cb.write_last(trainer)
            path = Path(ckpt_cb.last_model_path)
        else:
            path = last_checkpoint_path(trainer)
            trainer.save_checkpoint(path)  # written atomically (fsspec transaction); rank 0 writes
        if trainer.is_global_zero:
            print(f"SIGTERM: checkpoint saved to {path} at step {trainer.global_step}; resume with --ckpt_path {path}",
                  flush=True)


def last_checkpoint_path(trainer: L.Trainer) -> Path:
    """``<run>/checkpoints/last.ckpt``: where ModelCheckpoint keeps the last checkpoint of this run."""
    dirpath = getattr(trainer.checkpoint_callback, "dirpath", None) or Path(trainer.default_root_dir) / "checkpoints"
    return Path(dirpath) / "last.ckpt"


class LesionCheckpoint(ModelCheckpoint):
    """ModelCheckpoint (best by the monitored metric, as configured) that also keeps ``last.ckpt`` current.

    Lightning writes ``last.ckpt`` only when it also writes a top-k checkpoint, so a run whose validation
    Dice stopped improving would resume from its best step, not its last. This writes ``last.ckpt`` at every
    validation, at the end of training, and in between every ``last_every_n_steps`` training steps and/or
    every ``last_every_minutes`` minutes. Files are written atomically (Lightning saves through an fsspec
    transaction: a temporary file renamed into place), so a run killed mid-write keeps the previous one.

    Args:
        last_every_n_steps: also write last.ckpt every N training steps (null: only at validation).
        last_every_minutes: also write last.ckpt every M minutes of training (null: only at validation).
        **kwargs: ModelCheckpoint's arguments.
    """

    def __init__(self, *args: Any, last_every_n_steps: int | None = None, last_every_minutes: float | None = 15.0,
                 **kwargs: Any) -> None:
        if last_every_n_steps is not None and last_every_n_steps < 1:
            raise ValueError(f"checkpoint.last_every_n_steps={last_every_n_steps}: must be >= 1 (or null: off)")
        if last_every_minutes is not None and last_every_minutes <= 0:
            raise ValueError(f"checkpoint.last_every_minutes={last_every_minutes}: must be > 0 (or null: off)")
        super().__init__(*args, **kwargs)
        self.last_every_n_steps, self.last_every_minutes = last_every_n_steps, last_every_minutes
        self._last_time, self._last_step = time.monotonic(), -1
        self._due = False  # a periodic save is owed (the step count passed a multiple, or the minutes ran out)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._last_time = time.monotonic()  # minutes of training, not of set-up (e.g. a teacher-cache fill)

    def write_last(self, trainer: L.Trainer) -> None:
        """Write last.ckpt now (once per step)."""
        if self.save_last and self._last_step != trainer.global_step and not trainer.sanity_checking:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        self._last_time, self._last_step = time.monotonic(), trainer.global_step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        # Saved before the next step rather than at on_train_batch_end: Lightning runs the callbacks'
        # on_train_batch_end before the LightningModule's, where EMA teachers take their update of the step.
        super().on_train_batch_start(trainer, pl_module, *args)
        step = trainer.global_step
        if step > 0 and self.last_every_n_steps is not None and step % self.last_every_n_steps == 0:
            self._due = True
        if self.last_every_minutes is not None and time.monotonic() - self._last_time >= 60 * self.last_every_minutes:
            self._due = True
        if step == self._last_step:
            self._due = False  # last.ckpt already holds this step (written at its validation)
        if not self._due or step == 0:
            return
        self._save_between_steps(trainer)
        if trainer.is_global_zero:
            print(f"checkpoint: {self.last_model_path} at step {step}", flush=True)

    def _save_between_steps(self, trainer: L.Trainer) -> None:
        """last.ckpt describing the completed step: weights, EMA, optimiser and the loop counters alike.

        Lightning has counted the next batch as *ready* before ``on_train_batch_start``; saved as they are,
        the counters would describe a batch that never ran, and a resumed run would validate (and log) one
        step early (``tests/test_resume.py``). For the length of the save they are set back to the completed
        batch, the state Lightning itself saves at a validation's end ("restarted on last"): on resume the
        next batch is counted ready again, once. At an epoch's first batch the epoch counters say "epoch
        started" and the batch counters then say "no batch of it done": Lightning's mid-epoch restart.
        """
        progress = trainer.fit_loop.epoch_loop.batch_progress
        assert progress.total.started == progress.total.completed == progress.total.ready - 1, progress
        progress.total.ready -= 1
        progress.current.ready -= 1
        try:
            self.write_last(trainer)
        finally:
            progress.total.ready += 1
            progress.current.ready += 1
        self._due = False

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if trainer.state.fn == "fit":
            self.write_last(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self.write_last(trainer)


class DivergenceGuard(Callback):
    """Stop a run whose training loss explodes, before it writes a result.

    The reference is the supervised loss (``sup``, else the total ``loss``) of the run's first training step:
    the scale of a segmentation objective at initialisation. A step whose total loss exceeds ``max_ratio``
    times that reference raises :class:`~lesion_kd.errors.RunDiverged` naming the step and both values. At
    the default of 100 no committed cell comes near it (their largest logged loss is under 5x their first
    logged supervised loss, CauSSL's; ``tests/test_nonfinite.py`` checks every committed ``metrics.csv``), while
    ``--model.lr 1000`` (loss 1e14) or Mean Teacher at ``--model.consistency 1e9`` (1e5x at its first step)
    stop at once. Non-finite losses are the module's own check (``--on_nonfinite``). The reference is kept in
    checkpoints, so a resumed run judges by the same one. Under DDP the ranks agree (any rank's explosion
    stops all).

    Args:
        max_ratio: the threshold (``--max_loss_ratio``); 0 or less turns the check off.
    """

    def __init__(self, max_ratio: float = 100.0) -> None:
        self.max_ratio = max_ratio
        self.reference: float | None = None

    @staticmethod
    def loss_terms(pl_module: L.LightningModule) -> tuple[float, float] | None:
        """(this step's total loss, its supervised term or total) as logged by ``log_losses``, or None."""
        losses = getattr(pl_module, "_last_losses", None) or {}
        if "loss" not in losses:
            return None
        total = float(losses["loss"])
        return total, float(losses["sup"]) if "sup" in losses else total

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        terms = self.loss_terms(pl_module)
        if self.max_ratio <= 0 or terms is None or not all(np.isfinite(terms)):
            return
        total, sup = terms
        if self.reference is None:
            self.reference = abs(sup) if sup != 0 else abs(total)
        exploded = self.reference > 0 and abs(total) > self.max_ratio * self.reference
        flag = torch.tensor([float(exploded)])
        if torch.distributed.is_available() and torch.distributed.is_initialized() and trainer.world_size > 1:
            flag = flag.to(pl_module.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if float(flag.item()) > 0:
            from .errors import RunDiverged

            here = (f"loss {total:.3g} is {abs(total) / self.reference:.3g}x the supervised loss of the first step "
                    f"({self.reference:.3g})" if exploded else "another process's loss exploded")
            raise RunDiverged(
                f"training diverged at step {trainer.global_step}: {here}, over --max_loss_ratio {self.max_ratio:g}. "
                f"No result was written. Lower the learning rate or the loss weights (--max_loss_ratio 0 turns "
                f"this check off)")

    def state_dict(self) -> dict[str, Any]:
        return {"reference": self.reference}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.reference = state_dict.get("reference")


class StepSeeding(Callback):
    """Seed torch, NumPy and ``random`` before every training batch from (run seed, batch count, rank).

    The random draws of a training step (noise, dropout, perturbations, mixing boxes) then depend on the step
    only, not on what ran before it in this process (validation, a restarted data loader), so a run resumed
    from any checkpoint draws what the uninterrupted run drew. The same per-update seeding as fairseq's
    ``utils.torch_seed(seed, num_updates)``.
    """

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        import random

        from .data.sampling import mix_seed

        batches = trainer.fit_loop.epoch_loop.batch_progress.total.processed
        seed = mix_seed(os.environ.get("PL_GLOBAL_SEED", "0"), "step", batches, trainer.global_rank)
        torch.manual_seed(seed)  # all devices
        np.random.seed(seed % 2**32)
        random.seed(seed)
