"""``SemiKDModule``: the paper's method (Jia et al. 2026), as reconstructed in ``docs/method.md``.

A frozen MedSAM/LiteMedSAM teacher (through its embedding cache) guides the student with

    L = L_sup + lambda_kd(t) * L_pckd + lambda_dss(t) * L_dss,   lambda(t) = lambda * exp(-5 (1 - t/T)^2)

- L_sup: 0.5 * (CE + Dice) on the labeled weak views;
- L_pckd: perturbation-consistent cross-architecture KD on labeled and unlabeled weak views: the
  teacher's embedding, warped onto each view with the view's recorded geometry, is mapped into the
  student's deepest feature space (L_map) and both networks' responses to one shared perturbation draw
  are aligned through the student's decoder (L_resp); ``kd_mode`` switches to L_map alone, plain FitNets
  feature KD, or off (the ablation rows);
- L_dss: distribution-based self-supervision on unlabeled weak/strong pairs: class-balanced consistency,
  labeled/unlabeled distribution alignment, foreground/background feature contrast.

Only the student (``net``) is needed after training: the teacher is never part of the module's state
(nothing of it is saved in checkpoints), and the projector/regressor are training-only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch

from ..losses import DSSLoss, PCKDLoss
from ..losses.dss import ALIGN_STATS
from ..models import build_model
from .base import SegmentationModule
from .components import check_weights, ramp, total_steps


class SemiKDModule(SegmentationModule):
    """The paper's method: frozen MedSAM teacher -> Mamba student, three loss terms.

    Args:
        network: the student network (``mamba_unet``; any registered network works).
        teacher: teacher backend, ``litemedsam`` (default, bundled weights) or ``medsam``.
        teacher_checkpoint: checkpoint file of the ``medsam`` teacher (e.g. ``medsam_vit_b.pth``).
        teacher_mode: ``cache`` (embeddings of the un-augmented images, computed once and warped onto each
            view) or ``online`` (the teacher runs on every batch's views).
        teacher_cache_dir: root of the teacher cache (default ``$LESION_KD_CACHE/teacher``).
        lambda_kd: weight of L_pckd after the ramp.
        lambda_dss: weight of L_dss after the ramp.
        ramp_fraction: the ramp length T as a fraction of the run's total steps.
        kd_mode: ``pckd`` (L_map + beta * L_resp), ``map`` (L_map only), ``featkd`` (plain FitNets feature
            KD, the ablation alternative) or ``none`` (no distillation).
        kd_on_unlabeled: distil on unlabeled views too (not only labeled ones).
        kd_grid: where L_pckd's teacher side works. ``teacher``: the cached embedding is warped onto each view at
            the teacher's 64x64 grid and the projector's 1x1 conv, GroupNorm and GELU run there before the
            anti-aliased resize to the student's deepest grid (the committed runs before issue 29; about a third of a
            160-px training step on CPU, mostly the backward of that 64x64 stage: benchmarks/README.md).
            ``student``: the embedding is pooled, warped and resized to the student's grid first, without gradient
            (``lesion_kd.teacher_cache.aligned_coarse``), and the whole projector runs there. Changes the math
            (the projector's normalisation and activation see the pooled embedding); docs/method.md, 4.10.
        beta: weight of L_resp inside L_pckd.
        perturbation: shared perturbation of L_resp: ``noise``, ``channel_dropout``, ``feature_drop`` or ``none``.
        perturbation_strength: its strength (noise amplitude a, or the dropout probability).
        map_centered: L_map (and L_resp's teacher branch) compare the deepest features' deviations from
            their image mean (default); false: the uncentred L_map of method.md, which collapses the
            student's deepest feature to one direction (``lesion_kd.losses.pckd``; which committed results were
            trained with it: ``docs/method.md``, 4.1 and 4.9).
        map_relation_weight: weight of the relational term L_rel added to L_map (0: off, the default): the
            student's pixel-to-pixel similarities at the distilled stage matched to those of the teacher's raw
            embedding, which a rank-one student feature cannot match (``lesion_kd.losses.pckd``; a
            reconstruction beyond method.md).
        use_dss: switch L_dss on or off.
        gamma2: weight of the distribution-alignment term inside L_dss (10: at 0.1 the term, squared area gaps
            of about 0.01-0.03, weighs nothing and the lesion class spreads over the unlabeled images;
            experiments/results/diagnostics/README.md; which results used 0.1: ``docs/method.md``, 4.4 and 4.9).
        gamma3: weight of the contrast term inside L_dss.
        use_consistency: switch the class-balanced weak-to-strong consistency term.
        use_alignment: switch the labeled/unlabeled distribution alignment term.
        use_contrast: switch the foreground/background contrast term.
        dss_momentum: momentum of the moving average of labeled statistics.
        align_stats: the statistics the alignment term matches (default all four, method.md's: the batch mean
            and variance of the predicted lesion area and of the mean lesion confidence); e.g. ``[area_mean,
            area_var]`` holds the lesion area without pulling the unlabeled confidence toward the labeled one.
            The training log records ``train/conf_unlabeled`` and ``train/conf_labeled`` beside the areas.
        contrast_min_area: the contrast term leaves out unlabeled images whose predicted lesion covers less
            than this fraction of the image (0: every image with a soft foreground; see ``contrast_loss``).
        dss_balance_area: the class areas the consistency term balances by: ``labeled`` (default: the moving
            mean predicted lesion area of labeled images) or ``batch`` (the unlabeled batch's own predicted
            areas, method.md's literal reading, which weights the few lesion pixels of a batch with little
            predicted lesion tens of times and made BUSI's validation Dice dip: experiments/results/diagnostics/).
        contrast_form: ``softplus`` (default: log(1 + 1/ratio), the same push for poorly separated features,
            fading once they separate) or ``log`` (method.md's -log of the separation ratio, unbounded below,
            which kept pushing features apart along the student's own mask and made BUSI dip; see
            ``lesion_kd.losses.dss.contrast_loss``).
        lambda_pl: weight of L_pl, the teacher's pseudo-labels (0: off, the paper's method). The teacher's own
            read-out, a head on its frozen embedding (``lesion_kd.models.readout``, trained here on the labeled
            views only, so refreshed as it improves), labels each unlabeled weak view through the same recorded
            geometry; the student's prediction of the view is pulled to it by a confidence-weighted cross-entropy
            and soft Dice (each pixel weighted by the head's |2p - 1|), ramped as the other terms. Beyond
            ``docs/method.md``'s reconstruction: the teacher teaching segmentation, not only features (issue 28).
        pl_head_hidden: hidden channels of that head (0: a linear probe).
        pl_refine: ``none`` (the head's labels, refreshed every step) or ``box``: from step ``pl_refine_start``
            x the run's steps on, the unlabeled images' labels are the teacher's mask decoder prompted by the
            box of the head's canonical prediction (``lesion_kd.pseudo_labels``; the ground truth is never
            used), computed for every unlabeled image at once and again every ``pl_refine_every`` steps as the
            head improves, stored on the canonical grid (saved in checkpoints: exact resume) and brought onto
            each view by its recorded geometry. Needs ``teacher_mode: cache``; the decoder reads the teacher's
            embedding in its padded frame, a second cache (``PromptFrameCache``) filled for the unlabeled
            images in ``setup``.
        pl_refine_start: fraction of the run's steps after which the refined labels replace the head's.
        pl_refine_every: steps between two refreshes of the refined labels.
        pl_frame_encoder: how the frame cache's entries are computed (``torch``, ``onnx`` or ``hybrid``:
            ``lesion_kd.models.teacher_fast``; hybrid, about 2x faster on CPU, within its tested tolerance).
    """

    method_name = "semikd"
    display_name = "SemiKD (the paper's method)"
    variant_display_names = {  # by results_name
        "semikd_sup": "SemiKD ablation: L_sup only", "semikd_featkd": "SemiKD ablation: L_sup + plain feature KD",
        "semikd_map": "SemiKD ablation: L_sup + L_map", "semikd_pckd": "SemiKD ablation: L_sup + L_pckd",
        "semikd_dss": "SemiKD ablation: L_sup + L_dss",
        "semikd_plus": "SemiKD+ (+ teacher pseudo-labels)", "semikd_pl": "SemiKD+ ablation: L_sup + L_pl",
    }
    uses_unlabeled = True

    @property
    def results_name(self) -> str:
        """``semikd`` for the full method, else its ablation row: ``semikd_sup``, ``semikd_featkd``,
        ``semikd_map``, ``semikd_pckd``, ``semikd_dss`` (configs ``experiments/method/semikd_<row>.yaml``)."""
        kd, dss = self.hparams.kd_mode, self.hparams.use_dss
        if self.hparams.get("lambda_pl", 0.0) > 0:  # the teacher's pseudo-labels (SemiKD+)
            if kd == "pckd" and dss:
                return "semikd_plus"
            if kd == "none" and not dss:
                return "semikd_pl"
            return f"semikd_pl+{kd}" + ("+dss" if dss else "")
        if kd == "pckd" and dss:
            return "semikd"
        if kd == "none":
            return "semikd_dss" if dss else "semikd_sup"
        return f"semikd_{kd}" + ("+dss" if dss else "")

    # options added after runs were trained, with the value that trains as before they existed: a checkpoint
    # without them resumes (``lightning_cli.changed_hparams``)
    NEUTRAL_ADDED_OPTIONS = {"map_relation_weight": 0.0, "lambda_pl": 0.0, "pl_head_hidden": 64, "pl_refine": "none",
                             "pl_refine_start": 0.3, "pl_refine_every": 500, "pl_frame_encoder": "torch",
                             "kd_grid": "teacher"}

    def __init__(
        self,
        network: str = "mamba_unet",
        network_kwargs: dict[str, Any] | None = None,
        in_channels: int = 3,
        num_classes: int = 2,
        optimizer: Literal["sgd", "adamw"] = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 1e-2,
        momentum: float = 0.9,
        schedule: Literal["poly", "cosine", "constant"] = "cosine",
        poly_power: float = 0.9,
        warmup_steps: int = 0,
        teacher: str = "litemedsam",
        teacher_checkpoint: str | None = None,
        teacher_mode: Literal["cache", "online"] = "cache",
        teacher_cache_dir: str | None = None,
        lambda_kd: float = 1.0,
        lambda_dss: float = 1.0,
        ramp_fraction: float = 0.3,
        kd_mode: Literal["pckd", "map", "featkd", "none"] = "pckd",
        kd_on_unlabeled: bool = True,
        kd_grid: Literal["teacher", "student"] = "teacher",
        beta: float = 1.0,
        perturbation: Literal["noise", "channel_dropout", "feature_drop", "none"] = "noise",
        perturbation_strength: float = 0.3,
        map_centered: bool = True,
        map_relation_weight: float = 0.0,
        use_dss: bool = True,
        gamma2: float = 10.0,
        gamma3: float = 0.1,
        use_consistency: bool = True,
        use_alignment: bool = True,
        use_contrast: bool = True,
        dss_momentum: float = 0.99,
        contrast_min_area: float = 0.0,
        dss_balance_area: Literal["batch", "labeled"] = "labeled",
        contrast_form: Literal["log", "softplus"] = "softplus",
        align_stats: tuple[Literal["area_mean", "area_var", "conf_mean", "conf_var"], ...] = ALIGN_STATS,
        lambda_pl: float = 0.0,
        pl_head_hidden: int = 64,
        pl_refine: Literal["none", "box"] = "none",
        pl_refine_start: float = 0.3,
        pl_refine_every: int = 500,
        pl_frame_encoder: Literal["torch", "onnx", "hybrid"] = "torch",
    ) -> None:
        super().__init__(network, network_kwargs, in_channels, num_classes, optimizer, lr, weight_decay, momentum,
                         schedule, poly_power, warmup_steps)
        check_weights(ramp_fraction, lambda_kd=lambda_kd, lambda_dss=lambda_dss, beta=beta, gamma2=gamma2,
                      gamma3=gamma3, map_relation_weight=map_relation_weight, lambda_pl=lambda_pl)
        if teacher == "medsam" and teacher_checkpoint is None and kd_mode != "none":
            raise ValueError("model.teacher_checkpoint: the medsam teacher needs a checkpoint file (e.g. medsam_vit_b.pth)")
        if pl_refine != "none" and (lambda_pl <= 0 or teacher_mode != "cache"):
            raise ValueError(f"model.pl_refine={pl_refine!r} refines the teacher's pseudo-labels: it needs "
                             f"model.lambda_pl > 0 (got {lambda_pl}) and model.teacher_mode: cache (got {teacher_mode!r})")
        if not 0.0 <= pl_refine_start <= 1.0:
            raise ValueError(f"model.pl_refine_start={pl_refine_start}: a fraction of the run, in [0, 1]")
        if pl_refine_every < 1:
            raise ValueError(f"model.pl_refine_every={pl_refine_every}: at least 1 step")
        if teacher_checkpoint is not None and not Path(teacher_checkpoint).expanduser().is_file():
            raise ValueError(f"model.teacher_checkpoint={teacher_checkpoint!r}: file not found")
        self.pckd = (
            PCKDLoss(self.net.feature_channels[-1], 256, mode=kd_mode, beta=beta, perturbation=perturbation,
                     strength=perturbation_strength, centered=map_centered, relation_weight=map_relation_weight)
            if kd_mode != "none" else None
        )
        self.dss = (
            DSSLoss(gamma2, gamma3, use_consistency=use_consistency, use_alignment=use_alignment,
                    use_contrast=use_contrast, momentum=dss_momentum, contrast_min_area=contrast_min_area,
                    balance_area=dss_balance_area, contrast_form=contrast_form, align_stats=align_stats)
            if use_dss else None
        )
        # the teacher's read-out head (L_pl), built last and only when used: the paper's method (lambda_pl 0)
        # draws its initial weights exactly as before the option existed
        self.pl_head = build_model("litemedsam", num_classes=num_classes, hidden=pl_head_hidden) if lambda_pl > 0 else None
        # Kept out of the module tree on purpose: the teacher is frozen and never saved with the student.
        self.__dict__["_teacher_source"] = None
        # box-refined pseudo-labels (pl_refine="box"): (N_unlabeled, S, S) uint8 lesion probabilities x 255 on
        # the canonical grid and the step they were computed at; saved in checkpoints (on_save_checkpoint)
        self.__dict__["_pl_refined"] = None
        self.__dict__["_pl_refined_step"] = None

    # ----------------------------------------------------------------------------------- teacher
    @property
    def needs_teacher(self) -> bool:
        return self.pckd is not None or self.pl_head is not None

    def setup(self, stage: str) -> None:
        if stage != "fit" or not self.needs_teacher:
            return
        hp = self.hparams
        dm = self.wired_data  # lesion_kd.wiring.wire; the cached embeddings go back to it through sample_extras()
        if hp.teacher_mode == "online":
            from ..teacher_cache import OnlineTeacherEmbeddings

            src = OnlineTeacherEmbeddings(teacher_name=hp.teacher, checkpoint=hp.teacher_checkpoint)
            src.teacher.to(self.device)
            self.__dict__["_teacher_source"] = src
            return
        from ..teacher_cache import CachedEmbeddingExtras, TeacherEmbeddingCache

        samples = dm.labeled + (dm.unlabeled if hp.kd_on_unlabeled or self.pl_head is not None else [])
        cache = TeacherEmbeddingCache(hp.teacher_cache_dir, hp.teacher, hp.teacher_checkpoint, dm.dataset_name)
        strategy = self.trainer.strategy
        # each process fills a disjoint share, then every process checks the whole set (cheap when done)
        cache.fill(samples, rank=self.trainer.global_rank, world_size=self.trainer.world_size,
                   progress=self.trainer.is_global_zero)
        strategy.barrier("teacher-cache")
        cache.fill(samples, progress=False)
        fresh = TeacherEmbeddingCache(hp.teacher_cache_dir, hp.teacher, hp.teacher_checkpoint, dm.dataset_name)
        self.__dict__["_sample_extras"] = CachedEmbeddingExtras(fresh)  # a cache object without a built teacher pickles light
        if hp.get("pl_refine", "none") == "box":
            from ..teacher_cache import PromptFrameCache

            frames = PromptFrameCache(hp.teacher_cache_dir, hp.teacher, hp.teacher_checkpoint, dm.dataset_name,
                                      encoder=hp.pl_frame_encoder, device=self.device)
            frames.fill(dm.unlabeled, rank=self.trainer.global_rank, world_size=self.trainer.world_size,
                        progress=self.trainer.is_global_zero)
            strategy.barrier("teacher-frame-cache")
            frames.fill(dm.unlabeled, progress=False)
            self.__dict__["_pl_refine_sources"] = (fresh, frames, list(dm.unlabeled), dm.hparams.image_size)

    def _teacher_embeddings(self, views: torch.Tensor, part: dict) -> torch.Tensor:
        """(B, 256, 64, 64) float32 teacher embeddings aligned with ``views`` (B, 3, S, S); computed once per batch
        part and views (L_pckd and L_pl read the same weak views' embeddings in one step)."""
        kept = part.get("_teacher_emb_view")
        if kept is not None and kept[0] is views:
            return kept[1]
        if "teacher_emb" in part:
            from ..teacher_cache import aligned

            emb = aligned(part["teacher_emb"], part["theta"], (64, 64))
        else:
            src = self.__dict__["_teacher_source"]
            if src is None:
                raise RuntimeError("no teacher embeddings: the teacher cache was not set up (call fit through the CLI)")
            with torch.no_grad():
                emb = src.view_embeddings(None, views.float(), part["theta"], (64, 64))
        part["_teacher_emb_view"] = (views, emb)
        return emb

    def _kd_embeddings(self, part: dict, grid: tuple[int, int]) -> torch.Tensor:
        """L_pckd's teacher input for the weak views of ``part``: (B, 256, 64, 64) with ``kd_grid: teacher``, else
        the embedding already on the student's deepest ``grid`` (no gradient: the teacher is frozen)."""
        if self.hparams.get("kd_grid", "teacher") == "teacher":
            return self._teacher_embeddings(part["image_weak"], part)
        from ..losses.pckd import resize_features
        from ..teacher_cache import aligned_coarse

        if "teacher_emb" in part and "_teacher_emb_view" not in part:
            return aligned_coarse(part["teacher_emb"], part["theta"], grid)
        return resize_features(self._teacher_embeddings(part["image_weak"], part), grid)  # online, or already warped

    def _pseudo_label_terms(self, lab: dict, unl: dict | None, logits: torch.Tensor, n_lab: int, ramp: float,
                            losses: dict) -> torch.Tensor:
        """L_pl (weighted by lambda_pl and the ramp) plus the read-out head's own supervised loss.

        The head learns from the labeled views only (its input is the frozen teacher's embedding, so its loss
        moves nothing of the student); in eval mode (BatchNorm's running statistics, never the unlabeled
        batch's) it then labels the unlabeled weak views, whose student logits are pulled to its labels."""
        import torch.nn.functional as F

        from ..losses import pseudo_label_loss

        size = tuple(lab["mask"].shape[-2:])

        def head(emb: torch.Tensor) -> torch.Tensor:
            return F.interpolate(self.pl_head(emb.float()), size=size, mode="bilinear", align_corners=False)

        losses["pl_head"] = self.supervised_loss(head(self._teacher_embeddings(lab["image_weak"], lab)), lab["mask"])
        total = losses["pl_head"]
        if unl is not None:
            refined = self.__dict__["_pl_refined"]
            if refined is not None:  # the box-refined labels of the canonical images, onto the views
                from ..data.geometry import warp_to_view

                idx = torch.as_tensor(unl["index"]).cpu()
                canon = refined[idx][:, None].to(self.device, torch.float32).div_(255)
                q1 = warp_to_view(canon, unl["theta"].to(self.device, torch.float32), size)[:, 0]
                q = torch.stack([1 - q1, q1], dim=1)
            else:
                self.pl_head.eval()
                with torch.no_grad():
                    q = torch.softmax(head(self._teacher_embeddings(unl["image_weak"], unl)).float(), dim=1)
                self.pl_head.train(self.training)
            losses["pl"] = pseudo_label_loss(logits[n_lab:], q)
            self.log("train/pl_area", q[:, 1].ge(0.5).float().mean(), batch_size=n_lab)
            total = total + self.hparams.lambda_pl * ramp * losses["pl"]
        return total

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Box-refined pseudo-labels: computed at step pl_refine_start x total, then every pl_refine_every."""
        hp = self.hparams
        if hp.get("pl_refine", "none") == "none":
            return
        step, last = self.global_step, self.__dict__["_pl_refined_step"]
        if step < round(hp.pl_refine_start * total_steps(self)):
            return
        if last is None or step - last >= hp.pl_refine_every:
            self.refresh_refined_labels()

    @torch.no_grad()
    def refresh_refined_labels(self, chunk: int = 32) -> None:
        """Label every unlabeled image with the read-out head (eval mode) on its canonical cached embedding,
        refine each label by the teacher's mask decoder prompted with the label's box, and keep the result."""
        import time

        import torch.nn.functional as F
        from tqdm.auto import tqdm

        from ..data.io import read_image
        from ..pseudo_labels import refine_with_boxes

        sources = self.__dict__.get("_pl_refine_sources")
        if sources is None:
            raise RuntimeError("pl_refine: the frame cache was not set up (call fit through the CLI)")
        embeddings, frames, samples, size = sources
        sizes = self.__dict__.setdefault("_pl_image_hw", {})
        was_training = self.pl_head.training
        self.pl_head.eval()
        t0 = time.perf_counter()
        out, n_refined = [], 0
        bar = tqdm(range(0, len(samples), chunk), desc=f"pseudo-labels: box refinement at step {self.global_step}",
                   unit="chunk", disable=self._trainer is not None and not self.trainer.is_global_zero, leave=False)
        for i in bar:
            part = samples[i : i + chunk]
            emb = embeddings.get_batch(part).to(self.device, torch.float32)
            logits = F.interpolate(self.pl_head(emb).float(), size=(size, size), mode="bilinear", align_corners=False)
            probs = torch.softmax(logits, dim=1)[:, 1]
            for s in part:
                if s.id not in sizes:
                    sizes[s.id] = tuple(read_image(s.image).shape[:2])
            prompt_frames = [frames.prompt_frame(s, sizes[s.id]) for s in part]
            refined, was_refined = refine_with_boxes(frames.teacher, prompt_frames, probs)
            n_refined += int(was_refined.sum())
            out.append(refined.mul_(255).round_().to(torch.uint8))
        self.pl_head.train(was_training)
        self.__dict__["_pl_refined"] = torch.cat(out)
        self.__dict__["_pl_refined_step"] = self.global_step
        if self._trainer is not None:
            self.log("train/pl_refined_share", n_refined / max(1, len(samples)), batch_size=1)
            self.log("train/pl_refine_seconds", time.perf_counter() - t0, batch_size=1)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.__dict__["_pl_refined"] is not None:
            checkpoint["semikd_pl_refined"] = {"labels": self.__dict__["_pl_refined"],
                                               "step": self.__dict__["_pl_refined_step"]}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        kept = checkpoint.get("semikd_pl_refined")
        if kept is not None:
            self.__dict__["_pl_refined"] = kept["labels"]
            self.__dict__["_pl_refined_step"] = kept["step"]

    # ---------------------------------------------------------------------------------- training
    def ramp(self) -> float:
        return ramp(self, self.hparams.ramp_fraction)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        lab, unl = batch["labeled"], batch.get("unlabeled")
        n_lab = lab["image_weak"].shape[0]
        use_unl = unl is not None and (self.dss is not None or (self.pckd is not None and hp.kd_on_unlabeled)
                                       or self.pl_head is not None)

        # one forward over labeled weak (+ unlabeled weak) views
        weak = torch.cat([lab["image_weak"], unl["image_weak"]]) if use_unl else lab["image_weak"]
        feats = self.net.encode(weak)
        logits = self.net.decode(feats)
        losses: dict[str, torch.Tensor] = {}
        losses["sup"] = self.supervised_loss(logits[:n_lab], lab["mask"])
        total = losses["sup"]
        ramp = self.ramp()

        if self.pckd is not None:
            parts = [lab] + ([unl] if use_unl and hp.kd_on_unlabeled else [])
            n_kd = sum(p["image_weak"].shape[0] for p in parts)
            grid = tuple(feats[-1].shape[-2:])
            emb = torch.cat([self._kd_embeddings(p, grid) for p in parts]).to(feats[-1].dtype)
            kd_feats = [f[:n_kd] for f in feats]
            terms = self.pckd(kd_feats, emb, self.net.decode)
            losses.update({f"kd_{k}": v for k, v in terms.items() if k != "pckd"})
            losses["pckd"] = terms["pckd"]
            total = total + hp.lambda_kd * ramp * terms["pckd"]

        if self.pl_head is not None:
            total = total + self._pseudo_label_terms(lab, unl if use_unl else None, logits, n_lab, ramp, losses)

        if self.dss is not None and use_unl:
            logits_uw = logits[n_lab:]
            logits_us, feat_us = self.net.decode(self.net.encode(unl["image_strong"]), return_features=True)
            probs_l = torch.softmax(logits[:n_lab].detach().float(), dim=1)
            terms = self.dss(logits_uw, logits_us, feat_us, probs_labeled=probs_l)
            losses.update({f"dss_{k}": v for k, v in terms.items() if k != "dss"})
            losses["dss"] = terms["dss"]
            total = total + hp.lambda_dss * ramp * terms["dss"]
            # predicted lesion area (soft) of the unlabeled weak views against the labeled ones: self-training's
            # usual failure, the lesion class spreading over the background, shows as the first outgrowing the second
            stats_u = self.dss.alignment.batch_stats(torch.softmax(logits_uw.detach().float(), 1))
            stats_l = self.dss.alignment.batch_stats(probs_l)
            self.log("train/area_unlabeled", stats_u[0], batch_size=n_lab)
            self.log("train/area_labeled", stats_l[0], batch_size=n_lab)
            # mean lesion confidence: what the alignment's confidence statistics pull together
            self.log("train/conf_unlabeled", stats_u[2], batch_size=n_lab)
            self.log("train/conf_labeled", stats_l[2], batch_size=n_lab)

        losses["loss"] = total
        self.log("train/ramp", ramp, batch_size=n_lab)
        self.log_losses(losses, batch_size=n_lab)
        return total

