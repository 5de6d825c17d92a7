"""``teacher``: the frozen teacher's own segmentation, as a table row.

What the teacher could pass on to the student if it passed on its ability to segment and not only its
features: a light head (``lesion_kd.models.readout``, network ``litemedsam``) fitted on the teacher's cached
image embeddings of the *labeled* fraction only (the same images, views and budget as every other row),
evaluated on the test split at the suite's evaluation grid with the same metrics. The test and validation
images get cache entries of their own. The teacher itself stays frozen and outside the checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import SegmentationModule


class TeacherReadout(SegmentationModule):
    """The teacher's read-out: a head on the frozen LiteMedSAM embedding, trained on the labeled images only.

    Training views carry the cached embedding of their (un-augmented) image, brought onto the view by its
    recorded geometry (as SemiKD's distillation target); the head's 64x64 logits are up-sampled to the view
    and trained with the suite's supervised loss (0.5 CE + 0.5 Dice). Validation and test read the cached
    embeddings of their images (aligned with the full image, i.e. with the evaluation grid). ``predict`` on new
    images runs the teacher online.

    Args:
        network: the head (``litemedsam``; its options through ``network_kwargs``: ``hidden``, 0 for a linear probe).
        teacher: teacher backend whose embeddings are read (``litemedsam``).
        teacher_checkpoint: teacher checkpoint (default: the backend's own).
        teacher_cache_dir: root of the teacher cache (default ``$LESION_KD_CACHE/teacher``).
        **kwargs: :class:`SegmentationModule`'s options (optimizer, lr, schedule, ...).
    """

    method_name = "teacher"
    display_name = "Teacher read-out (LiteMedSAM + head)"
    uses_unlabeled = False

    def __init__(self, network: str = "litemedsam", teacher: str = "litemedsam", teacher_checkpoint: str | None = None,
                 teacher_cache_dir: str | None = None, **kwargs) -> None:
        super().__init__(network=network, **kwargs)
        self.save_hyperparameters()
        self.__dict__["_cache"] = None  # not a submodule: nothing of the teacher goes into the checkpoint
        self.__dict__["_online"] = None

    # ------------------------------------------------------------------------------------- embeddings
    def _open_cache(self, dataset_name: str):
        from ..teacher_cache import TeacherEmbeddingCache

        hp = self.hparams
        return TeacherEmbeddingCache(hp.teacher_cache_dir, hp.teacher, hp.teacher_checkpoint, dataset_name)

    def setup(self, stage: str) -> None:
        dm = self.wired_data  # lesion_kd.wiring.wire; the cached embeddings go back to it through sample_extras()
        splits = {"fit": ("val",), "validate": ("val",), "test": ("test",)}.get(stage, ())
        samples = (list(dm.labeled) if stage == "fit" else []) + [s for sp in splits for s in dm.splits[sp]]
        if not samples:
            return
        cache = self._open_cache(dm.dataset_name)
        # each process fills a disjoint share, then every process checks the whole set (cheap when done)
        cache.fill(samples, rank=self.trainer.global_rank, world_size=self.trainer.world_size,
                   progress=self.trainer.is_global_zero)
        self.trainer.strategy.barrier("teacher-cache")
        cache.fill(samples, progress=False)
        fresh = self._open_cache(dm.dataset_name)  # without a built teacher: pickles light into the loader workers
        self.__dict__["_cache"] = fresh
        if stage == "fit":
            from ..teacher_cache import CachedEmbeddingExtras

            self.__dict__["_sample_extras"] = CachedEmbeddingExtras(fresh)

    def _head_logits(self, emb: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        logits = self.net(emb.to(self.device, torch.float32))
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits for images (B, 3, H, W) in [0, 1]: the teacher run online (built on first use), then the head."""
        if self.__dict__["_online"] is None:
            from ..models import build_teacher

            hp = self.hparams
            kwargs = {"checkpoint": hp.teacher_checkpoint} if hp.teacher_checkpoint else {}
            self.__dict__["_online"] = build_teacher(hp.teacher, **kwargs).to(self.device)
        with torch.no_grad():
            emb = self.__dict__["_online"].embed(images.float())
        return self._head_logits(emb, tuple(images.shape[-2:]))

    def eval_logits(self, batch: dict, split: str) -> torch.Tensor:
        cache = self.__dict__["_cache"]
        if cache is None:
            return super().eval_logits(batch, split)
        dm = self.wired_data  # lesion_kd.wiring.wire
        emb = torch.stack([cache.get(dm.sample_by_index(split, int(i))).float() for i in batch["index"]])
        return self._head_logits(emb, tuple(batch["image"].shape[-2:]))

    # --------------------------------------------------------------------------------------- training
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        from ..teacher_cache import aligned

        lab = batch["labeled"]
        if "teacher_emb" not in lab:
            raise RuntimeError("no teacher embeddings in the batch: the teacher cache was not set up (fit through the CLI)")
        emb = aligned(lab["teacher_emb"], lab["theta"], (64, 64))
        logits = self._head_logits(emb, tuple(lab["mask"].shape[-2:]))
        loss = self.supervised_loss(logits, lab["mask"])
        self.log_losses({"loss": loss, "sup": loss}, batch_size=lab["mask"].shape[0])
        return loss
