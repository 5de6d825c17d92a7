"""``SegmentationModule``: the LightningModule base of every method.

It owns the network (built by name from the registry), the optimiser and schedule, the supervised loss,
and evaluation: per-image Dice/IoU/HD95/ASD and pooled HD95 (:mod:`lesion_kd.metrics`: ``hd95`` as MONAI,
``hd95_pooled`` as MedPy) on validation and test (gathered across DDP processes, not averaged per process),
the ``val/dice`` that picks the best checkpoint, ``metrics.json`` after a test (and, beside it, the predicted
masks of a few test images, ``predictions/<id>.png``, for the report's grid), and prediction masks/overlays.
A method subclass only adds its own training objective in ``training_step``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..data.io import atomic_write_bytes, read_mask, write_png
from ..metrics import METRICS, image_metrics, summarize
from ..models import build_model
from ..viz import kept_prediction_ids, mask_png, overlay, prediction_filename


def relax_deterministic_fill() -> None:
    """Keep deterministic algorithms, but stop filling every new uninitialised tensor with NaN.

    ``trainer.deterministic=true`` calls ``torch.use_deterministic_algorithms(True)``, which also switches on
    ``torch.utils.deterministic.fill_uninitialized_memory``, a debugging aid that writes NaN into every
    ``torch.empty`` result: about 11,000 fills per SemiKD training step, 10-15% of a cpu-profile step
    (``benchmarks/profile_cell.py``, benchmarks/README.md). No kernel here reads memory it has not written (a
    run's metrics are byte-identical with and without the fill: tests/test_determinism.py), so it costs time and
    changes nothing."""
    if torch.are_deterministic_algorithms_enabled():
        torch.utils.deterministic.fill_uninitialized_memory = False

class SegmentationModule(L.LightningModule):
    """Base of all methods: network, optimiser, supervised loss, evaluation and prediction.

    Args:
        network: registered network name (``unet``, ``mamba_unet``).
        network_kwargs: extra keyword arguments of the network constructor.
        in_channels: image channels given to the network.
        num_classes: output classes (2: background, lesion).
        optimizer: ``sgd`` (momentum, as SSL4MIS) or ``adamw``.
        lr: initial learning rate.
        weight_decay: weight decay.
        momentum: SGD momentum.
        schedule: ``poly`` (lr * (1 - t/T)^power), ``cosine`` or ``constant``, over the run's total steps.
        poly_power: exponent of the poly schedule.
        warmup_steps: linear warm-up steps before the schedule.
    """

    method_name = "base"
    # the method's name in the README's and the report's tables (its method_name when the class sets none), and
    # the names of the variants it tells apart by results_name (SemiKD's ablation rows)
    display_name = ""
    variant_display_names: dict[str, str] = {}
    uses_unlabeled = False

    def __init__(
        self,
        network: str = "unet",
        network_kwargs: dict[str, Any] | None = None,
        in_channels: int = 3,
        num_classes: int = 2,
        optimizer: Literal["sgd", "adamw"] = "sgd",
        lr: float = 0.01,
        weight_decay: float = 1e-4,
        momentum: float = 0.9,
        schedule: Literal["poly", "cosine", "constant"] = "poly",
        poly_power: float = 0.9,
        warmup_steps: int = 0,
    ) -> None:
        super().__init__()
        if lr <= 0:
            raise ValueError(f"model.lr={lr}: must be positive")
        self.save_hyperparameters()
        self.net = build_model(network, in_channels=in_channels, num_classes=num_classes, **(network_kwargs or {}))
        from monai.losses import DiceCELoss  # here, not at import: `lesion-kd fit --help` does not load MONAI

        # 0.5 * (CE + soft Dice), SSL4MIS' supervised loss.
        self.sup_loss = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=0.5, lambda_ce=0.5)
        self._eval: dict[str, dict[str, float]] = {}
        self._eval_orig: dict[str, dict[str, float]] = {}
        # the test images whose predicted masks a finished run keeps (predictions/<id>.png, for the report's grid)
        self._kept_ids: frozenset[str] = frozenset()
        self._kept: dict[str, np.ndarray] = {}
        # where predict writes masks and overlays; set by the CLI's --predict_output (not a hyperparameter:
        # LightningCLI would restore the training run's value from the checkpoint)
        self.predict_output: str | None = None
        # what a non-finite loss or gradient does: "stop" (raise, naming the term and step) or "skip" (drop
        # the step, counted); set by the CLI's --on_nonfinite
        self.on_nonfinite = "stop"
        self.skipped_steps = 0
        self._last_losses: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------------------------ model
    @property
    def results_name(self) -> str:
        """The method's name in result paths and tables (a variant of a method may name itself apart)."""
        return self.method_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def supervised_loss(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """0.5 * (CE + Dice); logits (B, C, H, W), mask (B, H, W) long."""
        return self.sup_loss(logits, mask[:, None])

    # -------------------------------------------------------------------------------- optimiser
    def configure_optimizers(self):
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        else:
            opt = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warm = hp.warmup_steps

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            t = min(1.0, (step - warm) / max(1, total - warm))
            if hp.schedule == "poly":
                return (1 - t) ** hp.poly_power
            if hp.schedule == "cosine":
                return 0.5 * (1 + math.cos(math.pi * t))
            return 1.0

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------------------- training
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        raise NotImplementedError

    def log_losses(self, losses: dict[str, torch.Tensor], batch_size: int) -> None:
        self._last_losses = {k: v.detach() for k, v in losses.items()}
        for k, v in losses.items():
            self.log(f"train/{k}", v.detach(), batch_size=batch_size, prog_bar=k == "loss")

    def _nonfinite(self) -> str | None:
        """A message naming the first non-finite loss term or gradient of this step, else None."""
        bad = [k for k, v in self._last_losses.items() if not bool(torch.isfinite(v).all())]
        if bad:
            terms = [k for k in bad if k != "loss"] or bad
            return (f"non-finite loss at step {self.global_step}: term(s) {', '.join(terms)} = "
                    f"{', '.join(str(float(self._last_losses[k])) for k in terms)}")
        for name, p in self.named_parameters():
            if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                return f"non-finite gradient at step {self.global_step} in parameter {name}"
        return None

    def on_before_optimizer_step(self, optimizer) -> None:
        # Lightning calls this after the closure (forward + backward), before optimizer.step().
        problem = self._nonfinite()
        if problem is None:
            return
        if self.on_nonfinite == "stop":
            raise FloatingPointError(problem + " (use --on_nonfinite skip to drop such steps instead)")
        for p in self.parameters():  # params without a gradient are left untouched by SGD/AdamW
            p.grad = None
        self.skipped_steps += 1
        self.log("train/skipped_steps", float(self.skipped_steps))
        import warnings

        warnings.warn(f"{problem}: step skipped ({self.skipped_steps} so far)", RuntimeWarning, stacklevel=2)

    # ------------------------------------------------------------------- the data module, wired explicitly
    _wired_data = None

    def on_fit_start(self) -> None:
        relax_deterministic_fill()

    def on_test_start(self) -> None:
        relax_deterministic_fill()

    def connect_data(self, data) -> None:
        """The data module this method trains and evaluates with, given by :func:`lesion_kd.wiring.wire` (which
        ``lesion-kd`` calls, and ``LesionDataModule.setup`` for a plain ``trainer.fit(model, datamodule=dm)``)."""
        self.__dict__["_wired_data"] = data

    @property
    def wired_data(self):
        """The data module given to :meth:`connect_data` (None before): its splits for set-up,
        ``hparams.eval_original_resolution`` and ``sample_by_index`` for evaluation."""
        return self._wired_data

    def sample_extras(self):
        """What the data module's training loaders add to each sample: a picklable callable (sample -> dict of
        entries), or None. Asked for when the loaders are built, after :meth:`setup`; a method that caches teacher
        embeddings there stores the callable as ``self.__dict__["_sample_extras"]``."""
        return self.__dict__.get("_sample_extras")

    # ----------------------------------------------------------------------------- evaluation
    def eval_logits(self, batch: dict, split: str) -> torch.Tensor:
        """(B, C, S, S) logits of an evaluation batch (validation, test); a method whose network does not take
        the image (the teacher's read-out reads cached embeddings) overrides this."""
        return self(batch["image"])

    def _eval_step(self, batch: dict, split: str) -> None:
        probs = torch.softmax(self.eval_logits(batch, split).float(), dim=1)
        pred = probs.argmax(1).cpu().numpy()
        target = batch["mask"].cpu().numpy()
        for i, sid in enumerate(batch["id"]):
            self._eval[sid] = image_metrics(pred[i], target[i])
            if split == "test" and sid in self._kept_ids:
                self._kept[sid] = pred[i] > 0
        dm = self.wired_data
        if split == "test" and getattr(getattr(dm, "hparams", None), "eval_original_resolution", False):
            for i, idx in enumerate(batch["index"].tolist()):
                sample = dm.sample_by_index("test", idx)
                orig = read_mask(sample.mask, sample.mask_threshold)
                up = F.interpolate(probs[i : i + 1], size=orig.shape, mode="bilinear", align_corners=False)
                self._eval_orig[sample.id] = image_metrics(up.argmax(1)[0].cpu().numpy(), orig)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_test_epoch_start(self) -> None:
        # the same few images in every cell of a dataset: chosen from the test split's ids alone (lesion_kd.viz)
        test = (getattr(self.wired_data, "splits", None) or {}).get("test") or []
        self._kept_ids, self._kept = frozenset(kept_prediction_ids([s.id for s in test])), {}

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _gather(self, results: dict) -> dict:
        """Per-image results of every process, merged by image id (DDP padding duplicates collapse)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts: list = [None] * dist.get_world_size()
            dist.all_gather_object(parts, results)
            merged: dict = {}
            for p in parts:
                merged.update(p)
            return merged
        return dict(results)

    def _finish_eval(self, split: str) -> dict | None:
        per_image, self._eval = self._gather(self._eval), {}
        if not per_image:
            return None
        summary = summarize(per_image)
        for m in METRICS:
            self.log(f"{split}/{m}", summary[m]["mean"], sync_dist=False, rank_zero_only=False)
        return summary

    def on_validation_epoch_end(self) -> None:
        self._finish_eval("val")

    def on_test_epoch_end(self) -> None:
        summary = self._finish_eval("test")
        orig, self._eval_orig = self._gather(self._eval_orig), {}
        kept, self._kept = self._gather(self._kept), {}
        run_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)  # a collective: every rank asks
        if summary is None or not self.trainer.is_global_zero:
            return
        for sid, mask in kept.items():  # 1-bit PNGs at the evaluation size, before metrics.json
            atomic_write_bytes(run_dir / "predictions" / prediction_filename(sid), mask_png(mask))
        write_json(run_dir / "metrics.json", summary)
        if orig:
            write_json(run_dir / "metrics_original_resolution.json", summarize(orig, resolution="original"))
        print(
            f"test ({summary['n_images']} images): Dice {summary['dice']['mean']:.4f} +- {summary['dice']['std']:.4f}  "
            f"IoU {summary['iou']['mean']:.4f}  HD95 {summary['hd95']['mean']:.2f} px (pooled, as MedPy: "
            f"{summary['hd95_pooled']['mean']:.2f} px)  ASD {summary['asd']['mean']:.2f} px"
        )
        print(f"metrics written to {run_dir / 'metrics.json'}")

    # ----------------------------------------------------------------------------- prediction
    def predict_step(self, batch: dict, batch_idx: int) -> list[str]:
        from ..data.io import read_image

        out_dir = Path(self.predict_output or Path(self.trainer.log_dir or ".") / "predictions")
        probs = torch.softmax(self(batch["image"]).float(), dim=1)
        written = []
        for i, path in enumerate(batch["path"]):
            h, w = batch["orig_hw"][i].tolist()
            up = F.interpolate(probs[i : i + 1], size=(h, w), mode="bilinear", align_corners=False)
            mask = (up.argmax(1)[0].cpu().numpy() > 0).astype(np.uint8)
            sid = batch["id"][i]
            write_png(out_dir / f"{sid}_mask.png", mask * 255)
            write_png(out_dir / f"{sid}_overlay.png", overlay(read_image(path), mask))
            written.append(str(out_dir / f"{sid}_mask.png"))
        return written


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode())
