"""Numerical guards: a non-finite loss stops the run naming the term and the step, or is skipped and counted."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lesion_kd.data import LesionDataModule
from lesion_kd.methods import Supervised


class BlowsUp(Supervised):
    """Supervised training whose loss turns into NaN at step 1 (a planted blow-up)."""

    def training_step(self, batch, batch_idx):
        lab = batch["labeled"]
        sup = self.supervised_loss(self(lab["image_weak"]), lab["mask"])
        if self.global_step == 1:
            sup = sup * float("nan")
        self.log_losses({"loss": sup, "sup": sup}, batch_size=2)
        return sup


def run(folder, tmp_path, mode: str) -> BlowsUp:
    torch.manual_seed(0)
    model = BlowsUp(network="unet", network_kwargs={"channels": [4, 8, 16, 32, 64]})
    model.on_nonfinite = mode
    dm = LesionDataModule(dataset=str(folder), image_size=32, labeled_fraction=0.5, labeled_batch_size=2,
                          num_workers=0, run_dir=str(tmp_path))
    trainer = L.Trainer(accelerator="cpu", max_steps=3, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    return model


def test_nan_loss_stops_with_the_term_and_step(folder_dataset, tmp_path):
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 1: term\(s\) sup = nan"):
        run(folder_dataset, tmp_path, "stop")


def test_nan_loss_step_is_skipped_and_counted(folder_dataset, tmp_path):
    with pytest.warns(RuntimeWarning, match="step skipped"):
        model = run(folder_dataset, tmp_path, "skip")
    assert model.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ------------------------------------------------------------------------------------------ divergence
class Ramps(Supervised):
    """Supervised training whose total loss is multiplied by ``factors[step]`` (a planted explosion)."""

    factors: tuple[float, ...] = (1.0, 1.0, 1.0)

    def training_step(self, batch, batch_idx):
        lab = batch["labeled"]
        sup = self.supervised_loss(self(lab["image_weak"]), lab["mask"])
        loss = sup * self.factors[min(self.global_step, len(self.factors) - 1)]
        self.log_losses({"loss": loss, "sup": sup}, batch_size=2)
        return loss


def guarded_fit(folder, tmp_path, factors, max_ratio=100.0):
    from lesion_kd.callbacks import DivergenceGuard

    torch.manual_seed(0)
    model = Ramps(network="unet", network_kwargs={"channels": [4, 8, 16, 32, 64]})
    model.factors = factors
    dm = LesionDataModule(dataset=str(folder), image_size=32, labeled_fraction=0.5, labeled_batch_size=2,
                          num_workers=0, run_dir=str(tmp_path))
    guard = DivergenceGuard(max_ratio)
    trainer = L.Trainer(accelerator="cpu", max_steps=len(factors), limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, callbacks=[guard])
    trainer.fit(model, datamodule=dm)
    return guard


def test_a_loss_beyond_the_ratio_of_the_first_supervised_loss_stops_the_run(folder_dataset, tmp_path):
    from lesion_kd.errors import RunDiverged

    with pytest.raises(RunDiverged, match=r"training diverged at step 2: loss \S+ is \d+x the supervised loss of "
                                          r"the first step \(\S+\), over --max_loss_ratio 100"):
        guarded_fit(folder_dataset, tmp_path, (1.0, 50.0, 1000.0, 1.0))


def test_a_ramp_within_the_ratio_trains_on_and_the_reference_is_kept_in_checkpoints(folder_dataset, tmp_path):
    guard = guarded_fit(folder_dataset, tmp_path, (1.0, 20.0, 60.0, 5.0))
    assert guard.reference is not None and guard.reference > 0
    assert guard.state_dict() == {"reference": guard.reference}
    off = guarded_fit(folder_dataset, tmp_path, (1.0, 1e6), max_ratio=0)  # 0: the check is off
    assert off.reference is None


def test_no_committed_cell_would_have_tripped_the_divergence_guard():
    """Every committed metrics.csv, Mean Teacher's, CauSSL's and the other ramps included: its largest logged
    loss against its first logged supervised loss (a stricter reference than the live one, the first step's,
    which is higher) stays far below the default ratio."""
    import csv
    from pathlib import Path

    from lesion_kd.callbacks import DivergenceGuard

    default = DivergenceGuard().max_ratio
    worst, checked = 0.0, 0
    for path in (Path(__file__).resolve().parents[1] / "experiments" / "results").rglob("metrics.csv"):
        rows = [r for r in csv.DictReader(path.open()) if r.get("train/loss")]
        if not rows:
            continue
        reference = float(rows[0].get("train/sup") or rows[0]["train/loss"])
        ratio = max(abs(float(r["train/loss"])) for r in rows) / reference
        assert ratio < default / 10, (path, ratio)
        worst, checked = max(worst, ratio), checked + 1
    assert checked >= 80 and worst > 1  # the committed cells were read (CauSSL's ramp reaches about 4.7x)
