"""``LesionDataModule``: labeled/unlabeled streams of weak/strong view pairs, and un-augmented eval sets."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import signal
import warnings
from dataclasses import replace
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader

from ..io_utils import atomic_copy
from ..wiring import wire
from .datasets import EvalDataset, ImageFolderDataset, ViewPairDataset
from .folder import Sample, scan_folder
from .io import DataError, atomic_write_bytes, read_image, split_image_name
from .listing import read_listing, split_listing
from .prep import cache_root, prepare_samples
from .registry import DATASETS, data_dir, random_split, split_file_name
from .sampling import StreamSampler
from .splits import SPLITS_DIR, load_or_write_splits
from .transforms import AugmentationConfig, ViewPairTransform

log = logging.getLogger(__name__)

#: what ``data.dataset`` means when neither it nor ``data.root`` is given
DEFAULT_DATASET = "kvasir-seg"


class LesionDataModule(L.LightningDataModule):
    """Labeled + unlabeled training views, validation, test and prediction data for 2D lesion segmentation.

    Training batches are dicts ``{"labeled": batch, "unlabeled": batch}`` (``"unlabeled"`` only when the
    method uses unlabeled images); each batch holds ``image_weak``, ``image_strong`` (B, 3, S, S),
    ``mask`` (B, S, S), ``theta`` (B, 2, 3), ``index`` and ``id``. Validation/test batches hold ``image``,
    ``mask``, ``index``, ``id`` at model size, un-augmented.

    Args:
        dataset: a known dataset's name (``kvasir-seg``, ``busi``, ``isic2018``, ``cvc-clinicdb``, ``ph2``),
            found under ``data_dir``, or a path to a folder of your own data (``images/`` and ``masks/``) or to
            a ``.csv`` listing. Unset (null): ``kvasir-seg``, unless ``root`` is given; then ``root`` is your
            own data.
        root: a folder of data. With ``dataset`` unset: your own data, i.e. a folder that itself holds
            ``images/`` and ``masks/`` (or a ``.csv`` listing), trained with a seeded split (``split_seed``,
            ``split_fractions``); a folder without ``images/`` is an error (to read a known dataset from the
            folder that holds it, set ``data_dir`` and ``dataset``). With a known ``dataset``: your copy of that
            dataset (the folder itself, e.g. ``.../Kvasir-SEG``), read with that dataset's split (the one committed
            in ``experiments/splits/`` where there is one). With any other ``dataset``: your own data, ``dataset``
            being only its label.
        data_dir: folder holding the known datasets (default: ``$LESION_KD_DATA``, else ``./data``).
        image_size: model input size S (images are squashed to S x S); a multiple of 32.
        labeled_fraction: fraction of the training split that keeps its labels, in (0, 1].
        label_seed: seed choosing which training images are labeled.
        split_seed: seed of the train/val/test split of a user folder (known datasets have fixed splits: the one
            committed in ``experiments/splits/``, else their seed-0 rule, kept in ``cache_dir`` and beside the run).
        split_fractions: train/val/test fractions for a user folder.
        include_normal: BUSI only: also use the 133 normal (empty-mask) images.
        labeled_batch_size: labeled samples per training batch.
        unlabeled_batch_size: unlabeled samples per training batch (used only by semi-supervised methods).
        eval_batch_size: batch size of validation, test and prediction.
        num_workers: data-loader worker processes (also used to prepare images in parallel).
        max_train_images: use only the first N images of the training split (smoke tests).
        max_val_images: use only the first N validation images.
        max_test_images: use only the first N test images.
        on_bad_sample: ``error`` stops at set-up naming the bad file; ``skip`` drops it with a warning and counts
            it (``bad_samples`` in ``split.json``). Skipped: an unreadable or corrupt image or mask, a mask whose
            size differs from its image's, a mask with more than two levels, and, in a user folder, an image
            without a mask (a mask without an image is ignored). Never skipped: a missing, empty or ambiguous
            folder (two files with one id), a CSV listing's rows, and files a known dataset's committed split
            names (its split would change).
        mask_threshold: binarise every mask at this value: lesion where the mask's value is ``>= mask_threshold``
            (on the file's own scale, e.g. 128 for 0-255 masks; a colour mask is reduced to its luma first). For
            JPEG or other lossy masks (CVC-ClinicDB's, Kvasir-SEG's originals), whose compression noise adds grey
            levels. Unset (null): a mask must have two levels already (0/1 or 0/255), anything else stops the run
            naming the file. Recorded in ``split.json``.
        cache_dir: where prepared images (and teacher embeddings) are cached (default ``$LESION_KD_CACHE`` or
            ``~/.cache/lesion_kd``); never inside the dataset folder.
        predict_input: what ``predict`` segments: ``test``/``val``/``train`` (a split of the dataset) or a path to
            an image file or a folder of images.
        eval_original_resolution: also compute test metrics at each image's original resolution, the
            prediction up-sampled to the original mask (written to ``metrics_original_resolution.json``).
        augmentation: strength of the weak and strong views.
        run_dir: where ``split.json`` (the ids this run uses) and, for a known dataset without a committed split,
            its split file ``<name>_v1.json`` are written (default: the trainer's log directory). Nothing is
            written into ``experiments/splits/`` or into the dataset folder.
    """

    def __init__(
        self,
        dataset: str | None = None,
        root: str | None = None,
        data_dir: str | None = None,
        image_size: int = 256,
        labeled_fraction: float = 0.1,
        label_seed: int = 0,
        split_seed: int = 0,
        split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
        include_normal: bool = False,
        labeled_batch_size: int = 8,
        unlabeled_batch_size: int = 8,
        eval_batch_size: int = 8,
        num_workers: int = 2,
        max_train_images: int | None = None,
        max_val_images: int | None = None,
        max_test_images: int | None = None,
        on_bad_sample: str = "error",
        mask_threshold: float | None = None,
        cache_dir: str | None = None,
        predict_input: str = "test",
        eval_original_resolution: bool = False,
        augmentation: AugmentationConfig | None = None,
        run_dir: str | None = None,
    ) -> None:
        super().__init__()
        if image_size <= 0 or image_size % 32:
            raise ValueError(f"data.image_size={image_size}: must be a positive multiple of 32")
        if not 0.0 < labeled_fraction <= 1.0:
            raise ValueError(f"data.labeled_fraction={labeled_fraction}: must be in (0, 1]")
        if on_bad_sample not in ("error", "skip"):
            raise ValueError(f"data.on_bad_sample={on_bad_sample!r}: must be 'error' or 'skip'")
        if mask_threshold is not None and not (math.isfinite(mask_threshold) and mask_threshold > 0):
            raise ValueError(f"data.mask_threshold={mask_threshold}: must be a positive number (lesion where the "
                             "mask's value is >= it), or null to require two-level masks")
        for name, v in (("labeled_batch_size", labeled_batch_size), ("eval_batch_size", eval_batch_size)):
            if v < 1:
                raise ValueError(f"data.{name}={v}: must be at least 1")
        if unlabeled_batch_size < 0:
            raise ValueError(f"data.unlabeled_batch_size={unlabeled_batch_size}: must be >= 0")
        self.save_hyperparameters(ignore=["augmentation"])
        self.augmentation = augmentation or AugmentationConfig()
        self.splits: dict[str, list[Sample]] = {}
        self.labeled: list[Sample] = []
        self.unlabeled: list[Sample] = []
        self.bad_samples: list[str] = []
        self.dataset_name = self.dataset_label
        self._split_file: tuple[str, Path] | None = None  # (name, cached file) of a known dataset's uncommitted split
        # what the method being trained tells this module (lesion_kd.wiring.wire -> attach): the module, whether it
        # takes the unlabeled stream, and a provider of per-sample extras (e.g. cached teacher embeddings)
        self._wired_to = None
        self._wants_unlabeled = False
        self._extras_provider = None
        self._scan_skipped: list[str] = []  # a user folder's images without a mask, masks without an image (skip)
        self._ready = False

    # ----------------------------------------------------------------------------------------- set-up
    @property
    def dataset_label(self) -> str:
        """The dataset's name as the options give it, before set-up (run names): a known dataset's name, else
        the name of the folder or listing (without ``.csv``)."""
        hp = self.hparams
        if hp.dataset is None and not hp.root:
            return DEFAULT_DATASET
        return Path(str(hp.dataset if hp.dataset is not None else hp.root)).name.removesuffix(".csv")

    def resolve(self) -> tuple[str, Path, list[Sample], dict[str, list[str]], str]:
        """(name, folder, samples, split ids, where the split came from) without touching any pixels."""
        hp = self.hparams
        self._split_file = None
        name = hp.dataset if hp.dataset is not None or hp.root else DEFAULT_DATASET
        if name in DATASETS:
            name, root, samples, splits, source = self._resolve_known(name)
        else:
            name, root, samples, splits, source = self._resolve_own(name)
        if hp.mask_threshold is not None:
            samples = [replace(s, mask_threshold=float(hp.mask_threshold)) for s in samples]
        return name, root, samples, splits, source

    def _resolve_known(self, name: str):
        """A known dataset, at ``data_dir/<folder>`` or at ``root`` (a copy): its committed split, else its split
        rule's split kept in the cache (and copied beside the run), never written into the repository."""
        hp = self.hparams
        spec = DATASETS[name]
        root = Path(hp.root).expanduser() if hp.root else data_dir(hp.data_dir) / spec.folder
        if hp.root and not root.is_dir():
            raise DataError(f"data.root={hp.root}: no such folder (where dataset {name!r} was to be read)")
        if not root.is_dir():
            raise DataError(
                f"{root}: dataset {name!r} not found; set data.data_dir or ${'LESION_KD_DATA'} to the folder "
                f"that holds {spec.folder}/, or data.root to the dataset folder itself"
            )
        samples = spec.samples(root, hp.include_normal)
        file_name = split_file_name(name, hp.include_normal)
        committed = SPLITS_DIR / file_name

        def make():
            return spec.splits(root, samples, hp.include_normal)

        known = {s.id for s in samples}
        if committed.is_file():
            try:
                splits = load_or_write_splits(committed, make, known, str(root))
            except DataError as e:
                if not hp.root:
                    raise
                raise DataError(
                    f"{e}. data.root={hp.root} is read as a copy of the known dataset {name!r} (data.dataset), with "
                    f"its committed split; to train on a folder of your own data with a seeded split, leave "
                    f"data.dataset unset (null)"
                ) from e
            return name, root, samples, splits, str(committed)
        # no committed split: the split rule's, kept per dataset folder in the cache (the next run reads it back
        # and checks it), and copied beside the run by _write_split_record
        where = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:12]
        cached = cache_root(hp.cache_dir) / "splits" / f"{Path(file_name).stem}-{where}.json"
        try:
            splits = load_or_write_splits(cached, make, known, str(root))
        except DataError as e:
            raise DataError(f"{e}. No split of {name!r} is committed in {SPLITS_DIR}; this one was drawn on an "
                            f"earlier run and kept in the cache: delete {cached} to draw it again") from e
        self._split_file = (file_name, cached)
        return name, root, samples, splits, f"{cached} ({name}'s split rule; not committed in {SPLITS_DIR})"

    def _resolve_own(self, name: str | None):
        """Your own data: a folder with ``images/`` and ``masks/``, or a ``.csv`` listing, with a seeded split."""
        hp = self.hparams
        root = Path(hp.root or name).expanduser()
        if root.name.lower().endswith(".csv"):  # a CSV listing of image/mask paths (lesion_kd.data.listing)
            samples, splits = read_listing(root)
            if splits is not None:
                return root.stem, root, samples, splits, f"split column of {root}"
            grouped = "patient-grouped " if any(s.group for s in samples) else ""
            splits = split_listing(samples, tuple(hp.split_fractions), hp.split_seed)
            return root.stem, root, samples, splits, f"seeded {grouped}split of {root} (seed {hp.split_seed})"
        if not root.is_dir():
            if hp.root:
                raise DataError(f"data.root={hp.root}: no such folder")
            known = ", ".join(sorted(DATASETS))
            raise DataError(f"data.dataset={name!r}: neither a known dataset ({known}) nor an existing folder")
        if hp.dataset is None and not (root / "images").is_dir():
            held = [n for n, spec in sorted(DATASETS.items()) if (root / spec.folder).is_dir()]
            hint = (f"; it holds the known dataset folder(s) {', '.join(DATASETS[n].folder + '/' for n in held)}: to "
                    f"train on one, use --data.data_dir {hp.root} --data.dataset {held[0]}") if held else ""
            raise DataError(
                f"data.root={hp.root}: no images/ folder. With data.dataset unset, data.root is a folder of your own "
                f"data that itself holds images/ and masks/ (or a .csv listing){hint}"
            )
        samples = scan_folder(root, skipped=self._scan_skipped if hp.on_bad_sample == "skip" else None)
        splits = random_split(samples, tuple(hp.split_fractions), hp.split_seed)
        return root.name, root, samples, splits, f"seeded split of {root} (seed {hp.split_seed})"

    def setup(self, stage: str | None = None) -> None:
        self._wire_trainer_module()
        if self._ready:
            return
        try:
            self._setup()
        except BaseException:
            self._remove_empty_run_dir()
            raise

    def _remove_empty_run_dir(self) -> None:
        """A set-up that fails (bad data, a bad option) leaves no empty run folder behind: the loggers make their
        ``version_<n>`` folder before the data module's set-up; removed here while it is still empty."""
        trainer = self.trainer
        if trainer is None or not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            try:
                log_dir = getattr(logger, "log_dir", None)  # CSV/TensorBoard: the version folder (no collective)
            except Exception:  # noqa: BLE001 - a logger without a folder: nothing to remove
                continue
            if not log_dir:
                continue
            folder = Path(log_dir)
            for d in (folder, folder.parent if folder.parent.name == getattr(logger, "name", None) else None):
                try:
                    if d is not None and d.is_dir() and not any(d.iterdir()):
                        d.rmdir()
                except OSError:
                    pass

    def _setup(self) -> None:
        hp = self.hparams
        self._scan_skipped = []
        name, root, samples, split_ids, source = self.resolve()
        self.dataset_name, self.root = name, root
        by_id = {s.id: s for s in samples}
        limits = {"train": hp.max_train_images, "val": hp.max_val_images, "test": hp.max_test_images}
        self.bad_samples = list(self._scan_skipped)
        if self._scan_skipped:
            warnings.warn(f"{root}: skipped {len(self._scan_skipped)} file(s) without a partner (data.on_bad_sample="
                          f"skip); first: {self._scan_skipped[0]}", stacklevel=2)
        for split, ids in split_ids.items():
            chosen = [by_id[i] for i in ids][: limits[split]] if limits[split] else [by_id[i] for i in ids]
            if not chosen:
                raise DataError(f"{root}: the {split} split is empty ({source})")
            good, bad = prepare_samples(chosen, hp.image_size, hp.cache_dir, hp.on_bad_sample, hp.num_workers,
                                        desc=f"{name} {split}: preparing images")
            self.bad_samples += bad
            self.splits[split] = good
        train = self.splits["train"]
        n_lab = max(1, round(hp.labeled_fraction * len(train)))
        rng = random.Random(hp.label_seed)
        lab_ids = set(rng.sample([s.id for s in train], n_lab))
        self.labeled = [s for s in train if s.id in lab_ids]
        self.unlabeled = [s for s in train if s.id not in lab_ids]
        if hp.labeled_batch_size > len(self.labeled):
            raise ValueError(
                f"data.labeled_batch_size={hp.labeled_batch_size} is larger than the labeled set "
                f"({len(self.labeled)} images = {hp.labeled_fraction} x {len(train)})"
            )
        self._write_split_record(name, source)
        self._ready = True
        log.info("%s: %d labeled, %d unlabeled, %d val, %d test", name, len(self.labeled), len(self.unlabeled),
                 len(self.splits["val"]), len(self.splits["test"]))

    def _write_split_record(self, name: str, source: str) -> None:
        """Write the exact ids this run uses beside the run (never into the dataset folder)."""
        run_dir = self.hparams.run_dir
        if run_dir is None and self.trainer is not None and self.trainer.log_dir is not None:
            run_dir = self.trainer.log_dir
        if run_dir is None or (self.trainer is not None and not self.trainer.is_global_zero):
            return
        if self._split_file is not None:  # a known dataset's uncommitted split: beside the run as well
            split_name, cached = self._split_file
            atomic_copy(cached, Path(run_dir) / split_name)
        doc = {
            "dataset": name, "root": str(self.root), "source": source,
            "mask_threshold": self.hparams.mask_threshold,
            "labeled_fraction": self.hparams.labeled_fraction, "label_seed": self.hparams.label_seed,
            "labeled": [s.id for s in self.labeled], "unlabeled": [s.id for s in self.unlabeled],
            "val": [s.id for s in self.splits["val"]], "test": [s.id for s in self.splits["test"]],
            "bad_samples": self.bad_samples,
        }
        atomic_write_bytes(Path(run_dir) / "split.json", (json.dumps(doc, indent=1) + "\n").encode())

    # ----------------------------------------------------------------------------- the method, wired
    def attach(self, module, uses_unlabeled: bool, sample_extras=None) -> None:
        """What the method ``module`` tells the data module (called by :func:`lesion_kd.wiring.wire`): whether it
        takes the unlabeled stream, and ``sample_extras``, a provider called when the training loaders are built
        (after the method's set-up) that returns a picklable callable adding entries to each training sample, or
        None."""
        self._wired_to = module
        self._wants_unlabeled = bool(uses_unlabeled)
        self._extras_provider = sample_extras

    def _wire_trainer_module(self) -> None:
        """The fallback for ``trainer.fit(model, datamodule=dm)`` without :func:`~lesion_kd.wiring.wire`: at set-up
        (Lightning's first hook), the module the trainer runs is wired by the same function, when it is not the one
        this data module is wired to (``lesion-kd`` wires them itself, and this does nothing)."""
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        if module is not None and module is not self._wired_to:
            wire(module, self)

    def _sample_extras(self):
        return self._extras_provider() if self._extras_provider is not None else None

    # ------------------------------------------------------------------------------------ loaders
    def _uses_unlabeled(self) -> bool:
        return self._wants_unlabeled and self.hparams.unlabeled_batch_size > 0

    def _loader(self, ds, batch_size: int, train: bool, stream: str = "") -> DataLoader:
        hp = self.hparams
        return DataLoader(
            ds, batch_size=batch_size, sampler=self._stream_sampler(len(ds), batch_size, stream) if train else None,
            shuffle=False, drop_last=train, num_workers=hp.num_workers, persistent_workers=hp.num_workers > 0,
            pin_memory=False, worker_init_fn=_worker_ignores_sigterm,
        )

    def _stream_sampler(self, n: int, batch_size: int, stream: str) -> StreamSampler:
        """The training stream's sampler, positioned after the batches already trained (0, or a resumed run's)."""
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        trainer = self.trainer
        fit_loop = getattr(trainer, "fit_loop", None)
        if fit_loop is None:  # a data module used outside a Trainer: a fresh stream
            return StreamSampler(n, batch_size, seed, stream, lambda: 0)
        # batches whose training step ran: a resumed run continues every stream after them
        progress = fit_loop.epoch_loop.batch_progress.total
        return StreamSampler(n, batch_size, seed, stream, lambda: progress.processed, epoch=trainer.current_epoch,
                             num_replicas=trainer.world_size, rank=trainer.global_rank)

    def _check_share(self, name: str, n: int, batch: int) -> None:
        """Each DDP process gets ceil(n / world) images of a stream; a batch larger than that share would
        give epochs without a single step (and a run that never reaches max_steps)."""
        world = getattr(self.trainer, "world_size", 1) if self.trainer is not None else 1
        share = -(-n // world)
        if batch > share:
            raise ValueError(
                f"data.{name}_batch_size={batch} is larger than each process's share of the {name} set "
                f"({share} of {n} images over {world} processes); lower the batch size or raise the fraction"
            )

    def train_dataloader(self):
        hp = self.hparams
        self._check_share("labeled", len(self.labeled), hp.labeled_batch_size)
        tf = ViewPairTransform(self.augmentation)
        extras = self._sample_extras()
        labeled = ViewPairDataset(self.labeled, hp.image_size, tf, hp.cache_dir, labeled=True, extras=extras)
        loaders = {"labeled": self._loader(labeled, hp.labeled_batch_size, True, "labeled")}
        if self._uses_unlabeled():
            if len(self.unlabeled) < hp.unlabeled_batch_size:
                raise ValueError(
                    f"data.unlabeled_batch_size={hp.unlabeled_batch_size} is larger than the unlabeled set "
                    f"({len(self.unlabeled)} images)"
                )
            self._check_share("unlabeled", len(self.unlabeled), hp.unlabeled_batch_size)
            unlabeled = ViewPairDataset(self.unlabeled, hp.image_size, ViewPairTransform(self.augmentation),
                                        hp.cache_dir, labeled=False, extras=extras)
            loaders["unlabeled"] = self._loader(unlabeled, hp.unlabeled_batch_size, True, "unlabeled")
        return CombinedLoader(loaders, mode="max_size_cycle")

    def val_dataloader(self):
        return self._loader(EvalDataset(self.splits["val"], self.hparams.image_size, self.hparams.cache_dir),
                            self.hparams.eval_batch_size, False)

    def test_dataloader(self):
        return self._loader(EvalDataset(self.splits["test"], self.hparams.image_size, self.hparams.cache_dir),
                            self.hparams.eval_batch_size, False)

    def predict_paths(self) -> list[Path]:
        src = self.hparams.predict_input
        if src in ("train", "val", "test"):
            return [s.image for s in self.splits[src]]
        p = Path(src).expanduser()
        if p.is_file():
            return [p]
        if not p.is_dir():
            raise DataError(f"data.predict_input={src!r}: not a split name (train/val/test), file or folder")
        paths = sorted(q for q in p.iterdir() if q.is_file() and not q.name.startswith(".") and split_image_name(q.name))
        if not paths:
            raise DataError(f"{p}: empty folder (no image files)")
        return paths

    def predict_dataloader(self):
        paths = self.predict_paths()
        good = []
        for q in paths:
            try:
                read_image(q)
                good.append(q)
            except DataError as e:
                if self.hparams.on_bad_sample == "error":
                    raise
                log.warning("skipping %s", e)
                self.bad_samples.append(str(e))
        return self._loader(ImageFolderDataset(good, self.hparams.image_size), self.hparams.eval_batch_size, False)

    def sample_by_index(self, split: str, index: int) -> Sample:
        return self.splits[split][index]


def _worker_ignores_sigterm(worker_id: int) -> None:
    """Loader workers leave SIGTERM to the training process. SLURM's preemption, ``kill -- -PGID`` and
    ``timeout`` signal the whole process group: a worker that died of it first made the training process fail
    with "DataLoader worker ... is killed by signal: Terminated" before its SIGTERM checkpoint was written.
    The training process still ends its workers when it exits, and a worker whose parent dies stops itself."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
