"""Segment any folder of images with an exported or checkpointed student.

For every image (any size; any format :func:`lesion_kd.data.io.read_image` reads: PNG, JPEG, BMP, TIFF,
gray, RGBA, 16-bit, ...) the output folder gets

- ``<id>_mask.png``: the lesion mask at the image's own resolution, 0/255;
- ``<id>_overlay.png``: the image with the mask drawn on it;
- a row of ``segments.csv``: id, file, height, width, lesion area in pixels and as a fraction of the
  image, the mean confidence (the predicted class's probability) over the lesion pixels and over the
  whole image, a status (``ok``, ``skipped``, ``error``) and the error message.

The model sees the image as it was trained: squashed to S x S (:func:`lesion_kd.data.prep.resize_image`),
RGB float in [0, 1]. Its softmax is resized bilinearly back to the image's size before the arg-max, as
``lesion-kd predict`` does. With ``tta`` the softmax is the mean over the identity, the horizontal and
the vertical flip (each flipped back).

An unreadable file is reported (in ``segments.csv`` and at the end) and skipped; it never stops the
batch. Images whose mask or overlay exists already are skipped (and said so) unless ``overwrite``;
their rows of an earlier ``segments.csv`` are kept.

Imports: for an ONNX model this module needs numpy, Pillow, OpenCV, tqdm and onnxruntime, and none of
torch, PyTorch Lightning or the training code (:mod:`lesion_kd.data.io` and :mod:`lesion_kd.data.prep`
are plain numpy/OpenCV). A TorchScript file or a ``.ckpt`` is run with torch, imported when one is opened.
"""

from __future__ import annotations

import csv
import io
import json
import os
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm.auto import tqdm

from ..data.io import DataError, atomic_write_bytes, read_image, split_image_name, write_png
from ..data.prep import resize_image
from ..viz import overlay
from . import metadata as md

__all__ = [
    "CSV_COLUMNS",
    "Predictor",
    "SegmentSummary",
    "list_images",
    "open_model",
    "predict_masks",
    "predict_probabilities",
    "segment_images",
]

CSV_NAME = "segments.csv"
CSV_COLUMNS = ("id", "file", "height", "width", "lesion_pixels", "lesion_fraction", "lesion_confidence",
               "image_confidence", "status", "error")
_ORT_INSTALL = ("running an ONNX model needs onnxruntime, which is not installed: pip install onnxruntime "
                "(a dependency of lesion-kd: pip install -e .)")


# --------------------------------------------------------------------------------------------------
# Models: one small interface over onnxruntime, TorchScript and Lightning checkpoints
# --------------------------------------------------------------------------------------------------
class Predictor:
    """A loaded student: ``predictor(batch)`` maps (B, 3, S, S) float32 [0, 1] to logits (B, C, S, S).

    Attributes: ``kind`` (onnx, torchscript, checkpoint), ``image_size`` (the side S images are
    squashed to), ``num_classes``, ``metadata`` (what the file says about itself), ``device``.
    """

    kind = "base"

    def __init__(self, path: Path, image_size: int, num_classes: int, metadata: dict[str, str], device: str) -> None:
        self.path, self.image_size, self.num_classes = path, image_size, num_classes
        self.metadata, self.device = metadata, device

    def __call__(self, batch: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self) -> str:
        net = self.metadata.get("network", "?")
        return f"{self.kind} {net} ({self.path.name}) at {self.image_size}x{self.image_size} on {self.device}"


def _env_threads() -> int:
    """Threads from OMP_NUM_THREADS (0: the runtime's default); shared machines set it to stay polite."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() else 0


def _resolve_size(path: Path, size: int | None, default: int, fixed: int | None, multiple: int,
                  max_size: int | None = None) -> int:
    """The inference side S: the fixed one of the file, else ``size``, else the recorded default."""
    if fixed is not None:
        if size is not None and size != fixed:
            raise ValueError(f"--size {size}: {path} was exported for {fixed}x{fixed} inputs only "
                             "(export it again with --size or --dynamic-size)")
        return fixed
    s = int(size) if size is not None else default
    if s <= 0 or s % multiple:
        raise ValueError(f"--size {s}: must be a positive multiple of {multiple} for {path.name}")
    if max_size is not None and s > max_size:
        raise ValueError(f"--size {s}: {path.name} was exported for sides up to {max_size} (export --max-size)")
    return s


class OnnxPredictor(Predictor):
    """An exported ONNX student run by onnxruntime (CPU, or CUDA when its provider is installed and asked for)."""

    kind = "onnx"

    def __init__(self, path: Path, size: int | None = None, threads: int | None = None, device: str = "auto",
                 spin_wait: bool = True) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ImportError(_ORT_INSTALL) from e
        options = ort.SessionOptions()
        options.intra_op_num_threads = _env_threads() if threads is None else threads
        options.inter_op_num_threads = 1
        if not spin_wait:
            # Idle pool threads sleep instead of spin-waiting. On a CPU shared with other jobs a spinning
            # thread that loses its core stalls every op (student at 256x256, 2 threads, one core busy
            # elsewhere: 108 ms per image spinning, 31 ms not); on an idle CPU spinning is faster (15.5
            # vs 25.8 ms). See benchmarks/README.md.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        available = ort.get_available_providers()
        if device == "cpu":
            providers = ["CPUExecutionProvider"]
        elif device in ("auto", "cuda"):
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
            if device == "cuda" and "CUDAExecutionProvider" not in available:
                raise ValueError(f"--device cuda: this onnxruntime has no CUDA provider (available: {', '.join(available)}); "
                                 "install onnxruntime-gpu or use --device cpu")
        else:
            raise ValueError(f"--device {device!r}: choose auto, cpu or cuda")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types for bad files
            raise ValueError(f"{path}: not a loadable ONNX model ({type(e).__name__}: {e})") from e
        meta = dict(self.session.get_modelmeta().custom_metadata_map)
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        shape = list(inp.shape)
        if len(shape) != 4:
            raise ValueError(f"{path}: expected one (batch, 3, height, width) input, found {inp.name} {shape}")
        h, w = shape[2], shape[3]
        fixed = None
        if isinstance(h, int) and isinstance(w, int):
            if h != w:
                raise ValueError(f"{path}: fixed input {h}x{w} is not square; lesion-kd squashes images to S x S")
            fixed = h
        out_shape = self.session.get_outputs()[0].shape
        classes = int(meta.get("num_classes") or (out_shape[1] if isinstance(out_shape[1], int) else 2))
        size_ = _resolve_size(path, size, int(meta.get("image_size") or 256), fixed, int(meta.get("size_multiple") or 32),
                              int(meta["max_size"]) if meta.get("max_size") else None)
        active = self.session.get_providers()[0]
        super().__init__(path, size_, classes, meta, "cuda" if active.startswith("CUDA") else "cpu")

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if self.device == "cuda":
            return self.session.run(None, {self.input_name: batch})[0]
        # On the CPU, one image per call: the graph materialises the scan's (B, D, N, L) states op by op,
        # and beyond one image they leave the cache (student at 256x256, one thread: 35 img/s one by
        # one, 21 img/s in one batch of 16).
        outs = [self.session.run(None, {self.input_name: batch[i : i + 1]})[0] for i in range(len(batch))]
        return np.concatenate(outs)


class TorchPredictor(Predictor):
    """A TorchScript export or a Lightning checkpoint (its plain student), run by torch."""

    def __init__(self, path: Path, size: int | None = None, threads: int | None = None, device: str = "auto",
                 checkpoint: bool | None = None) -> None:
        import torch  # only here: the ONNX path never imports torch

        if threads:
            torch.set_num_threads(threads)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._torch = torch
        if checkpoint is None:
            checkpoint = path.suffix == ".ckpt"
        if checkpoint:
            self.kind = "checkpoint"
            from ..models.loading import load_student  # torch and the networks: fine for a checkpoint

            raw = torch.load(path, map_location="cpu", weights_only=True)
            hp = dict(raw.get("hyper_parameters") or {})
            dm = dict(raw.get("datamodule_hyper_parameters") or {})
            self.net = load_student(str(path), map_location="cpu").to(device).eval()
            stride = getattr(self.net, "stride", 16)
            meta = {"network": str(hp.get("network", "unet")), "num_classes": str(hp.get("num_classes", 2)),
                    "image_size": str(dm.get("image_size") or 256), "size_multiple": str(stride)}
            fixed = None
        else:
            self.kind = "torchscript"
            extra = {md.TORCHSCRIPT_METADATA_FILE: ""}
            import warnings

            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)  # "torch.jit is deprecated"
                    self.net = torch.jit.load(str(path), map_location=device, _extra_files=extra)
            except Exception as e:  # noqa: BLE001 - torch.jit raises several types for a foreign file
                raise ValueError(f"{path}: neither .onnx, .ckpt nor a loadable TorchScript file ({e})") from e
            meta = json.loads(extra[md.TORCHSCRIPT_METADATA_FILE] or "{}")
            fixed = None if meta.get("dynamic_size", "true") == "true" else int(meta["image_size"])
        size_ = _resolve_size(path, size, int(meta.get("image_size") or 256), fixed, int(meta.get("size_multiple") or 32),
                              int(meta["max_size"]) if meta.get("max_size") else None)
        super().__init__(path, size_, int(meta.get("num_classes") or 2), {k: str(v) for k, v in meta.items()}, device)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
            return self.net(x).float().cpu().numpy()


def _is_torchscript_archive(path: Path) -> bool:
    """True for a TorchScript archive (it holds ``<archive>/code/``), False for a ``torch.save`` file
    (a checkpoint or a shipped student, whatever its extension)."""
    try:
        with zipfile.ZipFile(path) as z:
            return any("/code/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def open_model(path: str | os.PathLike, size: int | None = None, threads: int | None = None,
               device: str = "auto", spin_wait: bool = True) -> Predictor:
    """Open ``path`` by its kind: ``.onnx`` (onnxruntime), a lesion-kd checkpoint (``.ckpt``, or any
    ``torch.save`` file with the student's weights, as the shipped models), or a TorchScript archive.

    ``path`` that is not an existing file is looked up among the students shipped with the package
    (:mod:`lesion_kd.pretrained`: ``open_model("kvasir-seg")``); neither is an error naming the shipped ones.
    ``size``: the inference side for dynamic-size models (default: the size recorded at export or
    training); ``threads``: CPU threads (default: $OMP_NUM_THREADS, else the runtime's choice);
    ``device``: auto (a GPU when the runtime has one), cpu or cuda; ``spin_wait``: let onnxruntime's idle
    threads spin (fastest on a dedicated CPU; switch it off on a CPU shared with other jobs).
    """
    from .. import pretrained

    shipped = None if Path(path).expanduser().exists() else str(path)
    path = pretrained.resolve_model(str(path))
    if path.suffix.lower() == ".onnx":
        predictor: Predictor = OnnxPredictor(path, size, threads, device, spin_wait)
    elif path.suffix.lower() == ".ckpt" or zipfile.is_zipfile(path):
        checkpoint = path.suffix.lower() == ".ckpt" or not _is_torchscript_archive(path)
        predictor = TorchPredictor(path, size, threads, device, checkpoint=checkpoint)
    else:
        raise ValueError(f"--model {path}: unknown model file (expected .onnx, .ckpt or a TorchScript .pt archive)")
    if shipped is not None:
        predictor.kind = f"pretrained {shipped}"
    return predictor


def predict_masks(predictor: Predictor, images: Sequence[np.ndarray], tta: bool = False
                  ) -> list[tuple[np.ndarray, np.ndarray]]:
    """(mask (H, W) uint8 {0, 1}, confidence (H, W) float32) of each (H, W, 3) uint8 RGB image, at its own size.

    What ``lesion-kd segment`` does to every image: squash to S x S (:func:`resize_image`), RGB float in
    [0, 1], softmax (mean over flips with ``tta``), resized bilinearly back to the image's size, arg-max.
    """
    if not len(images):
        return []
    S = predictor.image_size
    batch = np.stack([resize_image(img, S) for img in images]).astype(np.float32)
    batch = batch.transpose(0, 3, 1, 2) / np.float32(255.0)
    probs = predict_probabilities(predictor, batch, tta)
    return [probabilities_to_image(p, img.shape[0], img.shape[1]) for img, p in zip(images, probs, strict=True)]


# --------------------------------------------------------------------------------------------------
# The inference core: numpy only
# --------------------------------------------------------------------------------------------------
def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def predict_probabilities(predictor: Callable[[np.ndarray], np.ndarray], batch: np.ndarray, tta: bool = False) -> np.ndarray:
    """Softmax (B, C, S, S) of a (B, 3, S, S) float batch; with ``tta`` the mean over identity, h- and v-flip."""
    if not tta:
        return _softmax(predictor(batch).astype(np.float32, copy=False))
    n = len(batch)
    views = np.concatenate([batch, batch[..., ::-1], batch[..., ::-1, :]])  # one call: 3B images
    p = _softmax(predictor(views).astype(np.float32, copy=False))
    return (p[:n] + p[n : 2 * n, ..., ::-1] + p[2 * n :, ..., ::-1, :]) / 3.0


def probabilities_to_image(probs: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(C, S, S) softmax -> (mask (H, W) uint8 {0, 1}: any non-background class, confidence (H, W) float32).

    Each class map is resized bilinearly (half-pixel centres, as F.interpolate with align_corners=False)
    before the arg-max; the confidence is the winning class's probability.
    """
    up = np.stack([cv2.resize(np.ascontiguousarray(c), (width, height), interpolation=cv2.INTER_LINEAR) for c in probs])
    label = up.argmax(0)
    return (label > 0).astype(np.uint8), up.max(0)


# --------------------------------------------------------------------------------------------------
# Folders
# --------------------------------------------------------------------------------------------------
def list_images(path: str | os.PathLike, exclude_outputs: bool = False) -> list[Path]:
    """The image files of a folder (by extension, sorted, not recursive, hidden files left out), or [file]."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"--input {path}: no such file or folder")
    files = []
    for f in sorted(path.iterdir()):
        if not f.is_file() or f.name.startswith(".") or split_image_name(f.name) is None:
            continue
        if exclude_outputs and f.name.endswith(("_mask.png", "_overlay.png")):
            continue  # our own outputs, when the output folder is the input folder
        files.append(f)
    if not files:
        raise FileNotFoundError(f"--input {path}: no image files (by extension) in this folder")
    return files


def _ids(files: Sequence[Path]) -> list[str]:
    """Output ids: the name without its image extension; the whole name where two files would share one."""
    ids: list[str] = []
    seen: set[str] = set()
    for f in files:
        parts = split_image_name(f.name)
        sid = parts[0] if parts else f.stem
        if sid in seen:
            sid = f.name  # a.png and a.jpg: a_mask.png and a.jpg_mask.png
        seen.add(sid)
        ids.append(sid)
    return ids


@dataclass
class SegmentSummary:
    """The outcome of :func:`segment_images`: one row per input file (CSV_COLUMNS), in input order."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    csv_path: Path | None = None

    def _with(self, status: str) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["status"] == status]

    @property
    def written(self) -> list[dict[str, Any]]:
        return self._with("ok")

    @property
    def skipped(self) -> list[dict[str, Any]]:
        return self._with("skipped")

    @property
    def failed(self) -> list[dict[str, Any]]:
        return self._with("error")


def _previous_rows(csv_path: Path) -> dict[str, dict[str, Any]]:
    """Rows of an earlier segments.csv by id (kept for images skipped because their outputs exist)."""
    if not csv_path.is_file():
        return {}
    try:
        with open(csv_path, newline="") as f:
            return {r["id"]: r for r in csv.DictReader(f) if r.get("id")}
    except (OSError, csv.Error, KeyError, UnicodeDecodeError):
        return {}  # an unreadable summary is rewritten from what this run knows


def _stats_row(sid: str, file: Path, mask: np.ndarray, conf: np.ndarray) -> dict[str, Any]:
    h, w = mask.shape
    area = int(mask.sum())
    lesion_conf = float(conf[mask > 0].mean()) if area else None
    return {
        "id": sid, "file": str(file), "height": h, "width": w, "lesion_pixels": area,
        "lesion_fraction": f"{area / (h * w):.6f}",
        "lesion_confidence": "" if lesion_conf is None else f"{lesion_conf:.4f}",
        "image_confidence": f"{float(conf.mean()):.4f}", "status": "ok", "error": "",
    }


def _write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())


def segment_images(
    inputs: str | os.PathLike,
    output: str | os.PathLike,
    predictor: Predictor,
    tta: bool = False,
    overwrite: bool = False,
    batch_size: int = 8,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> SegmentSummary:
    """Segment a folder (or one file) of images into ``output``; see the module docstring.

    Returns the per-image rows; ``segments.csv`` in ``output`` holds the same.
    """
    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size}: must be >= 1")
    inputs, output = Path(inputs), Path(output)
    same = inputs.is_dir() and output.exists() and output.resolve() == inputs.resolve()
    files = list_images(inputs, exclude_outputs=same)
    output.mkdir(parents=True, exist_ok=True)
    csv_path = output / CSV_NAME
    previous = _previous_rows(csv_path)
    rows: list[dict[str, Any] | None] = [None] * len(files)
    pending: list[tuple[int, str, Path, np.ndarray]] = []

    def flush() -> None:
        if not pending:
            return
        results = predict_masks(predictor, [img for *_, img in pending], tta)
        for (i, sid, f, img), (mask, conf) in zip(pending, results, strict=True):
            write_png(output / f"{sid}_mask.png", mask * 255)
            write_png(output / f"{sid}_overlay.png", overlay(img, mask))
            rows[i] = _stats_row(sid, f, mask, conf)
            bar.update(1)
        pending.clear()

    with tqdm(total=len(files), unit="img", desc="segment", disable=not progress) as bar:
        for i, (f, sid) in enumerate(zip(files, _ids(files), strict=True)):
            if not overwrite and ((output / f"{sid}_mask.png").exists() or (output / f"{sid}_overlay.png").exists()):
                old = previous.get(sid)
                rows[i] = {**(old or {"id": sid, "file": str(f)}), "status": "skipped",
                           "error": "outputs exist (--overwrite to redo)"}
                bar.update(1)
                continue
            try:
                img = read_image(f)
            except (DataError, OSError, ValueError, ImportError) as e:  # reported below and in the CSV
                rows[i] = {"id": sid, "file": str(f), "status": "error", "error": str(e)}
                bar.update(1)
                continue
            pending.append((i, sid, f, img))
            if len(pending) >= batch_size:
                flush()
        flush()

    summary = SegmentSummary([r for r in rows if r is not None], csv_path)
    _write_csv(csv_path, summary.rows)
    log(f"{len(summary.written)} segmented, {len(summary.skipped)} skipped, {len(summary.failed)} unreadable; "
        f"masks, overlays and {CSV_NAME} in {output}")
    if summary.skipped:
        names = ", ".join(Path(r["file"]).name for r in summary.skipped[:10])
        more = f" and {len(summary.skipped) - 10} more" if len(summary.skipped) > 10 else ""
        log(f"skipped (outputs exist; --overwrite to redo): {names}{more}")
    if summary.failed:
        log("unreadable files (skipped):")
        for r in summary.failed:  # DataError messages name the file already
            log(f"  {r['error']}" if r["file"] in r["error"] else f"  {r['file']}: {r['error']}")
    return summary
