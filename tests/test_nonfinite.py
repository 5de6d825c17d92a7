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
