"""The method and the data module are connected explicitly, by lesion_kd.wiring.wire (issue 32, item 5): the CLI
calls it right after instantiating them, and a plain ``trainer.fit(model, datamodule=dm)`` reaches the same function
through LesionDataModule.setup; neither side reads the other through the trainer."""

from __future__ import annotations

import lightning as L
import torch

from lesion_kd.data import LesionDataModule
from lesion_kd.lightning_cli import LesionCLI
from lesion_kd.methods import SegmentationModule, Supervised
from lesion_kd.wiring import wire

NET = {"network": "unet", "network_kwargs": {"channels": [4, 8, 16, 32, 64]}}


class Tagged:
    """Picklable per-sample extras: the sample's id length as a tensor."""

    def __call__(self, sample) -> dict:
        return {"tag": torch.tensor(len(sample.id))}


class WithExtras(Supervised):
    """A method that takes the unlabeled stream and provides extras from its set-up (as SemiKD's cache)."""

    uses_unlabeled = True

    def setup(self, stage: str) -> None:
        self.seen_data = self.wired_data
        if stage == "fit":
            self.__dict__["_sample_extras"] = Tagged()


def dm_for(root, **kw) -> LesionDataModule:
    args = dict(dataset=str(root), image_size=32, labeled_fraction=0.5, labeled_batch_size=2,
                unlabeled_batch_size=2, eval_batch_size=4, num_workers=0)
    return LesionDataModule(**{**args, **kw})


def test_wire_connects_both_ways_and_extras_are_asked_for_when_loaders_are_built(folder_dataset):
    model, dm = WithExtras(**NET), dm_for(folder_dataset)
    assert model.wired_data is None and not dm._uses_unlabeled() and dm._sample_extras() is None
    wire(model, dm)
    assert model.wired_data is dm and dm._uses_unlabeled()
    dm.setup()
    assert dm._sample_extras() is None  # nothing yet: the method's set-up makes it
    model.setup("fit")
    assert model.seen_data is dm
    batch, _, _ = next(iter(dm.train_dataloader()))
    assert set(batch) == {"labeled", "unlabeled"}
    for part in batch.values():
        assert part["tag"].tolist() == [len(i) for i in part["id"]]


def test_a_method_without_the_unlabeled_stream_gets_none(folder_dataset):
    dm = dm_for(folder_dataset)
    wire(Supervised(**NET), dm)
    dm.setup()
    batch, _, _ = next(iter(dm.train_dataloader()))
    assert set(batch) == {"labeled"} and "tag" not in batch["labeled"]
    wire(Supervised(**NET), dm_for(folder_dataset, unlabeled_batch_size=0))  # and None on either side is a no-op
    wire(None, dm)
    wire(Supervised(**NET), None)


def fit(model, dm, tmp_path) -> None:
    trainer = L.Trainer(accelerator="cpu", max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)


def test_fit_without_wire_wires_through_the_same_function(folder_dataset, tmp_path, monkeypatch):
    import lesion_kd.data.datamodule as dm_module

    calls = []
    monkeypatch.setattr(dm_module, "wire", lambda m, d: (calls.append((m, d)), wire(m, d)))
    torch.manual_seed(0)
    model, dm = WithExtras(**NET), dm_for(folder_dataset, run_dir=str(tmp_path))
    fit(model, dm, tmp_path)
    assert calls == [(model, dm)]
    assert model.wired_data is dm and model.seen_data is dm and dm._uses_unlabeled()
    # another module fitted with the same data module is wired in its place; an explicit wire() is kept
    other = Supervised(**NET)
    fit(other, dm, tmp_path)
    assert other.wired_data is dm and not dm._uses_unlabeled() and len(calls) == 2
    wire(model, dm)
    fit(model, dm, tmp_path)
    assert len(calls) == 2 and dm._uses_unlabeled()


def test_the_cli_wires_right_after_instantiation(folder_dataset, tmp_path):
    cli = LesionCLI(SegmentationModule, LesionDataModule, subclass_mode_model=True, run=False,
                    save_config_callback=None, parser_kwargs={"default_env": False},
                    args=["--model", "lesion_kd.methods.MeanTeacher", "--model.network", "unet",
                          "--data.dataset", str(folder_dataset), "--data.image_size", "32",
                          "--data.eval_original_resolution", "true",
                          "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false"])
    assert cli.model.wired_data is cli.datamodule
    assert cli.datamodule._wired_to is cli.model and cli.datamodule._uses_unlabeled()
