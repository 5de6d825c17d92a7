"""On-disk cache of the frozen teacher's image embeddings, and the online alternative with the same API.

The teacher is frozen and deterministic, so its embedding is a pure function of the image: compute it once
per training image (from the un-augmented image, at the teacher's own resolution) and read it back each
step. An entry holds the (256, 64, 64) embedding aligned with the full extent of the image, i.e. with the
*canonical* image of :mod:`lesion_kd.data.geometry`; a view's recorded ``theta`` brings it onto the view::

    cache = TeacherEmbeddingCache(dataset="kvasir-seg")            # litemedsam, default cache dir
    cache.fill(train_samples, rank=rank, world_size=world_size)    # once; resumable; skips valid entries
    emb = cache.view_embeddings(samples, views, theta)             # (B, 256, 64, 64), warped onto the views

Photometric augmentations are not applied to the embedding. :class:`OnlineTeacherEmbeddings` has the same
``view_embeddings`` and runs the teacher on the augmented views instead (for experiments where the teacher
must see the augmentation).

Layout: ``<cache_dir>/<dataset>/<teacher fingerprint>/<h[:2]>/<h>.emb`` with ``h`` the SHA-256 of the
image file. The fingerprint holds the backend, the preprocessing version and the checkpoint's SHA-256, so
a changed image or teacher simply misses; stale entries are never read. One file per entry: a 64-byte
header (magic, format version, shape, payload size, CRC-32 of the payload) and the raw little-endian
float16 payload (2 MiB). Entries are written to a temporary file and renamed into place, so an interrupted
fill leaves either a whole entry or none; a truncated or garbled entry fails the header/CRC check on read
and is recomputed.

Encoders (:mod:`lesion_kd.models.teacher_fast`): ``encoder="torch"`` (the default) runs the teacher's own
PyTorch module, as every cache filled so far; ``"onnx"`` (onnxruntime, fp32) and ``"hybrid"`` (LiteMedSAM
only: onnxruntime fp32 stem + bf16 transformer GEMMs, about 2x faster per image on the 2-core CPU) compute
within a tested tolerance of it and key their entries with a suffixed fingerprint (``<teacher>-ehybrid1``),
so they fill their own folder and never mix with ``torch`` entries. Training reads the entries of
``encoder=None``, i.e. ``$LESION_KD_TEACHER_ENCODER`` if set, else ``torch``: the faster encoders are
opt-in (``lesion-kd cache-teacher --encoder hybrid`` plus ``LESION_KD_TEACHER_ENCODER=hybrid`` for the
run), so committed runs keep reading exactly the entries they were trained with. The fill of ``onnx`` /
``hybrid`` also reads the next image and writes the last entry in a background I/O thread while the
encoder runs.

Under DDP each process fills a disjoint part (entries ``i % world_size == rank``); the caller puts a
barrier after ``fill`` before the first read.

Default cache directory: ``$LESION_KD_CACHE/teacher``, else ``~/.cache/lesion_kd/teacher``.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import warnings
import zlib
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data.folder import Sample
from .data.geometry import warp_to_view
from .data.io import read_image
from .io_utils import atomic_write_bytes
from .models import build_teacher
from .models.teacher import EMBED_SHAPE, teacher_fingerprint
from .models.teacher_fast import build_image_encoder, check_encoder, encoder_fingerprint

ENCODER_ENV = "LESION_KD_TEACHER_ENCODER"


def default_encoder() -> str:
    """``$LESION_KD_TEACHER_ENCODER`` if set (``torch``, ``onnx`` or ``hybrid``), else ``torch``."""
    return check_encoder(os.environ.get(ENCODER_ENV) or "torch")

_MAGIC = b"LKDTEMB\x00"
_FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sIIIIQI")  # magic, version, C, H, W, payload bytes, CRC-32 of payload
_HEADER_SIZE = 64  # fixed, so the payload starts 64-byte aligned
_PAYLOAD_BYTES = int(np.prod(EMBED_SHAPE)) * 2


class CacheMiss(KeyError):
    """No cached embedding for this image and teacher; fill the cache first."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0]) if self.args else ""


class CorruptEntry(ValueError):
    """A cache file that is truncated, garbled or of the wrong shape."""


def default_cache_dir() -> Path:
    """``$LESION_KD_CACHE/teacher`` if the variable is set, else ``~/.cache/lesion_kd/teacher``.

    ``$LESION_KD_CACHE`` is the suite's cache root (the data module keeps its prepared images under
    ``prep/`` there), so the teacher's entries get their own sub-folder.
    """
    env = os.environ.get("LESION_KD_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "lesion_kd") / "teacher"


_CONTENT_MEMO: dict[tuple[str, int, int], str] = {}


def image_content_hash(path: str | os.PathLike) -> str:
    """SHA-256 of an image file's bytes, memoised per (path, mtime, size) so per-step lookups are cheap."""
    path = Path(path)
    st = path.stat()
    key = (str(path), st.st_mtime_ns, st.st_size)
    digest = _CONTENT_MEMO.get(key)
    if digest is None:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        _CONTENT_MEMO[key] = digest
    return digest


def encode_entry(embedding: torch.Tensor) -> bytes:
    """(256, 64, 64) tensor -> header + float16 payload bytes."""
    if tuple(embedding.shape) != EMBED_SHAPE:
        raise ValueError(f"teacher embedding must be {EMBED_SHAPE}, got {tuple(embedding.shape)}")
    payload = embedding.detach().to("cpu", torch.float16).contiguous().numpy().astype("<f2", copy=False).tobytes()
    header = _HEADER.pack(_MAGIC, _FORMAT_VERSION, *EMBED_SHAPE, len(payload), zlib.crc32(payload))
    return header.ljust(_HEADER_SIZE, b"\0") + payload


def decode_entry(data: bytearray | bytes, name: str = "entry") -> torch.Tensor:
    """Header + payload -> (256, 64, 64) float16 tensor (sharing ``data`` if it is a bytearray).

    Raises :class:`CorruptEntry` naming ``name`` on a short file, a wrong header or shape, or a CRC mismatch.
    """
    if len(data) < _HEADER_SIZE:
        raise CorruptEntry(f"{name}: {len(data)} bytes, shorter than the {_HEADER_SIZE}-byte header")
    magic, version, c, h, w, nbytes, crc = _HEADER.unpack_from(data)
    if magic != _MAGIC or version != _FORMAT_VERSION:
        raise CorruptEntry(f"{name}: not a teacher-cache entry of format {_FORMAT_VERSION} (magic {magic!r}, version {version})")
    if (c, h, w) != EMBED_SHAPE or nbytes != _PAYLOAD_BYTES:
        raise CorruptEntry(f"{name}: shape {(c, h, w)} / {nbytes} bytes, expected {EMBED_SHAPE} / {_PAYLOAD_BYTES}")
    if len(data) != _HEADER_SIZE + nbytes:
        raise CorruptEntry(f"{name}: {len(data) - _HEADER_SIZE} payload bytes, expected {nbytes} (truncated?)")
    if zlib.crc32(memoryview(data)[_HEADER_SIZE:]) != crc:
        raise CorruptEntry(f"{name}: payload checksum mismatch (garbled file)")
    if isinstance(data, bytes):
        data = bytearray(data)
    # Little-endian float16 on disk; every platform torch runs on is little-endian.
    return torch.frombuffer(data, dtype=torch.float16, offset=_HEADER_SIZE).view(*EMBED_SHAPE)


def _read_entry(path: Path) -> torch.Tensor:
    with open(path, "rb") as f:
        data = bytearray(os.fstat(f.fileno()).st_size)
        f.readinto(data)
    return decode_entry(data, str(path))


def _atomic_write(path: Path, data: bytes) -> None:
    """Readers see a whole entry or none; an interrupted fill leaves no 2 MiB orphans behind (only a killed
    process can): :func:`lesion_kd.io_utils.atomic_write_bytes`, per-process temporary name (DDP ranks may
    race on one entry)."""
    atomic_write_bytes(path, data)


def _safe_name(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("._") or "_"


def aligned(embeddings: torch.Tensor, theta: torch.Tensor, size: tuple[int, int] = (64, 64)) -> torch.Tensor:
    """Bring canonical-aligned embeddings (B, 256, 64, 64) onto views with geometry ``theta`` (B, 2, 3).

    Returns float32 (B, 256, *size) on ``theta``'s device; cells that show no part of the image are 0.
    A thin wrapper of :func:`lesion_kd.data.geometry.warp_to_view` (float32: grid_sample in half precision
    is not available on every CPU build and loses the sub-cell positions).
    """
    return warp_to_view(embeddings.to(theta.device, torch.float32), theta.to(torch.float32), size)


def aligned_coarse(embeddings: torch.Tensor, theta: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Canonical embeddings (B, C, 64, 64) onto views with geometry ``theta`` (B, 2, 3), at a coarse grid ``size``.

    The cheap path of L_pckd's teacher side (``SemiKDModule(kd_grid="student")``, issue 29): the embedding is
    average-pooled to the coarsest power-of-two fraction of its grid that is still at least four times ``size``
    (64 -> 32 for the student's 5x5 or 8x8 bottleneck), warped onto the view at that grid, then resized to
    ``size`` (anti-aliased bilinear, :func:`lesion_kd.losses.pckd.resize_features`). Against ``aligned`` at 64x64
    followed by the same resize it differs only by the warp's interpolation at the pooled grid (per-cell cosine
    >= 0.999, tests/test_semikd.py; at twice the size the resize's own smoothing already differs by 0.5%); the warp
    costs a quarter. Returns float32 (B, C, *size) on ``theta``'s device.
    """
    from .losses.pckd import resize_features

    size = (int(size[0]), int(size[1]))
    grid = inter = embeddings.shape[-1]
    if embeddings.shape[-2] == grid:  # square, as the teacher's 64x64: halve while 4x the target is kept
        while inter % 2 == 0 and inter // 2 >= 4 * max(size):
            inter //= 2
    x = embeddings.to(theta.device, torch.float32)
    if inter < grid:
        x = F.avg_pool2d(x, grid // inter)
    x = warp_to_view(x, theta.to(torch.float32), tuple(x.shape[-2:]))
    return resize_features(x, size)


def _image_tensor(path: Path) -> torch.Tensor:
    """(1, 3, H, W) float in [0, 1] from any image file."""
    return torch.tensor(read_image(path)).permute(2, 0, 1).unsqueeze(0).float().div_(255.0)  # copies: read-only array


class TeacherEmbeddingCache:
    """Embeddings of one teacher for one dataset, on disk, keyed by image content.

    Args:
        cache_dir: root of all caches (default :func:`default_cache_dir`); must lie outside the dataset.
        teacher_name, checkpoint, teacher_kwargs: what :func:`lesion_kd.models.build_teacher` gets; the
            teacher itself is built only when an entry has to be computed.
        dataset: dataset name, the first level of the key.
        teacher: an already built teacher (anything with ``embed`` and ``fingerprint``) instead of a name.
        device: where a teacher built here runs (default CPU).
        encoder: how the image encoder runs when an entry is computed: ``torch`` (the teacher's module,
            today's entries), ``onnx`` or ``hybrid`` (faster, own fingerprint; see the module doc).
            Default :func:`default_encoder` (``torch`` unless ``$LESION_KD_TEACHER_ENCODER`` says otherwise).
    """

    KEY_SUFFIX = ""  # appended to the entries' key by caches of another kind of entry (PromptFrameCache)

    def __init__(self, cache_dir: str | os.PathLike | None = None, teacher_name: str = "litemedsam",
                 checkpoint: str | os.PathLike | None = None, dataset: str = "kvasir-seg", *,
                 teacher: nn.Module | None = None, teacher_kwargs: dict | None = None,
                 device: str | torch.device = "cpu", encoder: str | None = None) -> None:
        self.encoder = check_encoder(encoder) if encoder is not None else default_encoder()
        self.root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        self.teacher_name = teacher_name
        self.checkpoint = checkpoint
        self.teacher_kwargs = dict(teacher_kwargs or {})
        self.dataset = dataset
        self.device = torch.device(device)
        self._teacher = teacher
        fingerprint = teacher.fingerprint if teacher is not None else teacher_fingerprint(
            teacher_name, checkpoint, **self.teacher_kwargs)
        self.teacher_fingerprint: str = fingerprint  # the teacher's own identity
        self.fingerprint: str = encoder_fingerprint(fingerprint, self.encoder) + self.KEY_SUFFIX  # the entries' key
        self._image_encoder: nn.Module | None = None
        self.dir = self.root / _safe_name(dataset) / _safe_name(self.fingerprint)

    def __repr__(self) -> str:
        return f"TeacherEmbeddingCache({str(self.dir)!r})"

    @property
    def teacher(self) -> nn.Module:
        """The teacher, built on first use (reading the cache never needs it)."""
        if self._teacher is None:
            kwargs = dict(self.teacher_kwargs)
            if self.checkpoint is not None:
                kwargs["checkpoint"] = self.checkpoint
            self._teacher = build_teacher(self.teacher_name, **kwargs).to(self.device)
            if self._teacher.fingerprint != self.teacher_fingerprint:  # the file changed since the cache opened
                raise RuntimeError(f"teacher changed while the cache was open: {self._teacher.fingerprint} "
                                   f"!= {self.teacher_fingerprint}; open the cache again")
        return self._teacher

    @property
    def image_encoder(self) -> nn.Module | None:
        """The image encoder run the ``encoder`` way (built, and for onnx/hybrid exported, on first use);
        ``None`` for ``torch``: the teacher's ``embed`` uses its own module, exactly as before."""
        if self.encoder == "torch":
            return None
        if self._image_encoder is None:
            self._image_encoder = build_image_encoder(self.teacher, self.encoder)
        return self._image_encoder

    # --------------------------------------------------------------------------------------------- keys
    def entry_path(self, sample: Sample) -> Path:
        """The file that holds (or will hold) ``sample``'s embedding."""
        h = image_content_hash(sample.image)
        return self.dir / h[:2] / f"{h}.emb"

    def is_valid(self, sample: Sample) -> bool:
        """True if a complete, uncorrupted entry exists (reads and checks the whole file)."""
        try:
            _read_entry(self.entry_path(sample))
        except (FileNotFoundError, CorruptEntry):
            return False
        return True

    # ------------------------------------------------------------------------------------------ writing
    def compute(self, sample: Sample, image: torch.Tensor | None = None) -> torch.Tensor:
        """The teacher's embedding of the un-augmented image, (256, 64, 64) float16 on the CPU.

        ``image``: the already read (1, 3, H, W) image of ``sample`` (the fill reads ahead in a thread).
        """
        image = _image_tensor(sample.image) if image is None else image
        if self.encoder == "torch":
            return self.teacher.embed(image)[0].to("cpu", torch.float16)  # today's path, unchanged
        with torch.inference_mode():
            return self.teacher.embed(image, image_encoder=self.image_encoder)[0].to("cpu", torch.float16)

    def _store(self, sample: Sample) -> torch.Tensor:
        emb = self.compute(sample)
        _atomic_write(self.entry_path(sample), encode_entry(emb))
        return emb

    def _check_outside_dataset(self, samples: Sequence[Sample]) -> None:
        root = self.root.resolve()
        for dataset_root in {Path(s.image).resolve().parent.parent for s in samples}:
            if root == dataset_root or dataset_root in root.parents:
                raise ValueError(f"cache directory {self.root} lies inside the dataset folder {dataset_root}; "
                                 "datasets are read-only: choose a cache directory outside it")

    def fill(self, samples: Sequence[Sample], rank: int = 0, world_size: int = 1, progress: bool = True) -> int:
        """Compute and store the missing or corrupt entries of ``samples[i]`` with ``i % world_size == rank``.

        Resumable: valid entries are skipped, so an interrupted fill continues where it stopped. Returns the
        number of entries computed by this process.
        """
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, world_size={world_size})")
        samples = list(samples)
        self._check_outside_dataset(samples)
        mine = samples[rank::world_size]
        todo, seen = [], set()
        for s in mine:
            path = self.entry_path(s)
            if path in seen:  # identical image files share an entry
                continue
            seen.add(path)
            if not self.is_valid(s):
                todo.append(s)
        bar = tqdm(todo, desc=f"teacher cache [{self.fingerprint}]" + (f" rank {rank}" if world_size > 1 else ""),
                   unit="img", position=rank if world_size > 1 else None, disable=not progress,
                   postfix={"already cached": len(seen) - len(todo)})
        if self.encoder == "torch":
            for s in bar:  # today's loop, unchanged
                self._store(s)
        else:
            self._fill_pipelined(todo, bar)
        bar.close()
        return len(todo)

    def _fill_pipelined(self, todo: list[Sample], bar: tqdm) -> None:
        """The fill loop of the onnx/hybrid encoders: one I/O thread reads the next image and writes the last
        entry while the encoder runs (the encoder keeps its own threads). A write that failed raises here."""
        if not todo:
            return
        self.image_encoder  # noqa: B018 - build/export before the first image, not inside the bar's first step
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher-cache-io") as pool:
            nxt: Future = pool.submit(_image_tensor, todo[0].image)
            writing: Future | None = None
            for i, s in enumerate(bar):
                image = nxt.result()
                if i + 1 < len(todo):
                    nxt = pool.submit(_image_tensor, todo[i + 1].image)
                emb = self.compute(s, image)
                if writing is not None:
                    writing.result()
                writing = pool.submit(_atomic_write, self.entry_path(s), encode_entry(emb))
            writing.result()

    # ------------------------------------------------------------------------------------------ reading
    def get(self, sample: Sample) -> torch.Tensor:
        """(256, 64, 64) float16 embedding of ``sample``'s canonical image.

        Raises :class:`CacheMiss` (a KeyError) if there is no entry; a corrupt entry is reported with a
        warning, recomputed (building the teacher) and rewritten.
        """
        path = self.entry_path(sample)
        try:
            return _read_entry(path)
        except FileNotFoundError:
            raise CacheMiss(f"{sample.id} ({sample.image}): no teacher embedding at {path}; fill the cache first "
                            "(lesion-kd cache-teacher, or TeacherEmbeddingCache.fill)") from None
        except CorruptEntry as e:
            warnings.warn(f"{e}; recomputing this teacher-cache entry", RuntimeWarning, stacklevel=2)
            return self._store(sample)

    def get_batch(self, samples: Sequence[Sample]) -> torch.Tensor:
        """(B, 256, 64, 64) float16 embeddings, in the order of ``samples``."""
        return torch.stack([self.get(s) for s in samples])

    def view_embeddings(self, samples: Sequence[Sample], views: torch.Tensor | None, theta: torch.Tensor,
                        size: tuple[int, int] = (64, 64)) -> torch.Tensor:
        """Cached embeddings brought onto the views: float32 (B, 256, *size) on ``theta``'s device.

        ``theta`` (B, 2, 3) is each view's recorded geometry; ``views`` is unused (same signature as
        :meth:`OnlineTeacherEmbeddings.view_embeddings`).
        """
        return aligned(self.get_batch(samples), theta, size)


class PromptFrameCache(TeacherEmbeddingCache):
    """The teacher's image embedding in its own padded model frame: what its prompt encoder and mask decoder
    read (:meth:`lesion_kd.models.teacher.SAMTeacher.decode_boxes`), where :class:`TeacherEmbeddingCache` keeps
    the embedding cropped and stretched onto the canonical image (which the decoder cannot take back). Same
    arguments, layout, atomic entries, DDP fill and resumability; entries are keyed ``<fingerprint>-frame1``
    (own folder). Used by SemiKD+'s box-refined pseudo-labels (``SemiKDModule(pl_refine="box")``); the mask
    decoder needs the frame, the image's input size and the valid region, which :meth:`prompt_frame` returns.
    """

    KEY_SUFFIX = "-frame1"

    def __repr__(self) -> str:
        return f"PromptFrameCache({str(self.dir)!r})"

    def compute(self, sample: Sample, image: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder's output on the padded model input, (256, 64, 64) float16 on the CPU."""
        image = _image_tensor(sample.image) if image is None else image
        with torch.inference_mode():
            x, _ = self.teacher.preprocess(image)
            encoder = self.teacher.image_encoder if self.image_encoder is None else self.image_encoder
            return encoder(x)[0].float().to("cpu", torch.float16)

    def prompt_frame(self, sample: Sample, image_size: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int],
                                                                                   tuple[int, int]]:
        """(frame (1, 256, 64, 64) float32, valid (h, w) in the model input, the image's (H, W)): the argument
        of ``decode_boxes`` for ``sample`` whose image is ``image_size`` = (H, W) pixels."""
        valid = self.teacher._resized_shape(*image_size)
        return self.get(sample).float()[None].to(self.device), tuple(valid), tuple(image_size)


class CachedEmbeddingExtras:
    """Picklable per-sample loader for the data-loader workers: ``{"teacher_emb": (256, 64, 64) float16}`` of a
    cache (open it without a built teacher, so that it pickles light); a method's ``sample_extras``."""

    def __init__(self, cache: TeacherEmbeddingCache) -> None:
        self.cache = cache

    def __call__(self, sample: Sample) -> dict:
        return {"teacher_emb": self.cache.get(sample)}


class OnlineTeacherEmbeddings:
    """Runs the teacher on every batch's (augmented) views; ``view_embeddings`` as the cache's.

    Args: ``teacher`` (a built teacher) or ``teacher_name`` / ``checkpoint`` / ``teacher_kwargs``.
    """

    def __init__(self, teacher: nn.Module | None = None, teacher_name: str = "litemedsam",
                 checkpoint: str | os.PathLike | None = None, teacher_kwargs: dict | None = None) -> None:
        if teacher is None:
            kwargs = dict(teacher_kwargs or {})
            if checkpoint is not None:
                kwargs["checkpoint"] = checkpoint
            teacher = build_teacher(teacher_name, **kwargs)
        self.teacher = teacher

    def view_embeddings(self, samples: Sequence[Sample] | None, views: torch.Tensor, theta: torch.Tensor | None = None,
                        size: tuple[int, int] = (64, 64)) -> torch.Tensor:
        """The teacher's embedding of each view (B, 3, h, w) in [0, 1]: float32 (B, 256, *size).

        The views already carry their geometry, so ``samples`` and ``theta`` are unused.
        """
        emb = self.teacher.embed(views)
        if tuple(emb.shape[-2:]) != tuple(size):
            emb = F.interpolate(emb, size, mode="bilinear", align_corners=False)
        return emb


def fill_teacher_cache(samples: Sequence[Sample], dataset: str, teacher: str = "litemedsam",
                       checkpoint: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                       rank: int = 0, world_size: int = 1, progress: bool = True, encoder: str | None = None,
                       **teacher_kwargs: object) -> TeacherEmbeddingCache:
    """Fill the cache of ``teacher`` for ``samples`` of ``dataset`` (this process's share); return the cache.

    The entry point of ``lesion-kd cache-teacher``; ``encoder`` as :class:`TeacherEmbeddingCache`'s;
    ``teacher_kwargs`` go to ``build_teacher``.
    """
    cache = TeacherEmbeddingCache(cache_dir, teacher, checkpoint, dataset, teacher_kwargs=teacher_kwargs,
                                  encoder=encoder)
    cache.fill(samples, rank=rank, world_size=world_size, progress=progress)
    return cache
