"""Export the student network of any method checkpoint to ONNX or TorchScript, verified before it is written.

Only the plain student is exported (:func:`lesion_kd.models.loading.load_student`: no teacher, projector
or training code). Contract of the exported graph (also stored in the file, :mod:`.metadata`)::

    image  float32 (batch, 3, S, S), RGB in [0, 1], no mean/std normalisation  ->  logits (batch, C, S, S)

with a dynamic batch size and either a fixed S (default: the checkpoint's training image size) or, with
``dynamic_size``, any height and width that are multiples of the network's stride (32 for the student).

The Mamba student's selective scan is exported through its loop-free formulation (cumulative sums and
exponentials over chunks of 8 steps, a fixed number of ops, no Loop/Scan node): for ONNX (and for a
dynamic-size TorchScript) the shape-polymorphic, ONNX-Runtime-friendly variant of :mod:`.export_scan`; a
fixed-size TorchScript keeps the model's own chunked formulation, which torch runs faster. Before anything is written, the exported file is
loaded back (onnxruntime, or ``torch.jit.load``) and its logits are compared with the eager PyTorch
network's on random inputs (two batch sizes; several spatial sizes when the size is dynamic) and on real
images; above ``tolerance`` (default 1e-4) the export is refused. The file is written to a temporary name
beside ``out`` and renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .. import __version__
from ..data.io import IMAGE_EXTENSIONS, DataError, read_image
from ..data.prep import resize_image
from ..io_utils import atomic_path
from . import metadata as md
from .export_scan import export_scan_formulation, levels_for, longest_scan

__all__ = ["ExportError", "ExportReport", "checkpoint_image_size", "export_network", "export_student", "find_verification_images",
           "network_metadata"]

FORMATS = ("onnx", "torchscript")
DEFAULT_SIZE = 256
# How the user installs what an export needs (torch.onnx's exporter needs onnxscript, verification needs
# onnxruntime); these are dependencies of lesion-kd, so a missing one means a broken environment.
_INSTALL = "pip install onnx onnxscript onnxruntime (they are dependencies of lesion-kd: pip install -e .)"


class ExportError(RuntimeError):
    """The export could not be made or did not match the eager network; nothing was written."""


@dataclass
class VerifyCheck:
    """One verification input set: its name, shape, largest |logit difference| and pixel agreement of masks."""

    name: str
    shape: tuple[int, ...]
    max_abs_diff: float
    mask_agreement: float


@dataclass
class ExportReport:
    """What :func:`export_student` wrote and how it was verified."""

    path: Path
    format: str
    metadata: dict[str, str]
    checks: list[VerifyCheck] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def max_abs_diff(self) -> float:
        return max((c.max_abs_diff for c in self.checks), default=float("nan"))


def _say(text: str) -> None:
    """The default ``log``: a line on stdout at once (a pipe or a log file would hold it back otherwise)."""
    print(text, flush=True)


class _Steps:
    """Status lines of the long steps (torch.export, the ONNX translation, tracing, loading, verifying: tens of
    seconds each for the Mamba student on a CPU), each with the seconds since the export began."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.log, self.t0 = log, time.perf_counter()

    def __call__(self, text: str) -> None:
        self.log(f"  [{time.perf_counter() - self.t0:4.0f} s] {text}")


def _require(module: str, why: str):
    """Import ``module`` or raise an ImportError that says how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{why} needs the '{module}' package, which is not installed: {_INSTALL}") from e


def _load_checkpoint_hparams(ckpt: Path) -> tuple[dict, dict]:
    """(model hyper-parameters, datamodule hyper-parameters) of a Lightning checkpoint, loaded safely."""
    try:
        raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a foreign or broken file
        raise ExportError(f"--ckpt {ckpt}: not a readable lesion-kd checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(raw, dict) or "state_dict" not in raw:
        raise ExportError(f"--ckpt {ckpt}: not a Lightning checkpoint (no state_dict)")
    return dict(raw.get("hyper_parameters") or {}), dict(raw.get("datamodule_hyper_parameters") or {})


def checkpoint_image_size(dm_hparams: dict, default: int = DEFAULT_SIZE) -> int:
    """The training image size recorded in a checkpoint's datamodule hyper-parameters, else ``default``."""
    size = dm_hparams.get("image_size")
    return int(size) if isinstance(size, int | float) and size > 0 else default


def _size_multiple(net: nn.Module) -> int:
    """The factor every input side must be a multiple of (the network's total down-sampling)."""
    stride = getattr(net, "stride", None)
    if stride is None:  # the reference U-Net: one halving per level after the first
        stride = 2 ** (len(getattr(net, "feature_channels", (0,) * 5)) - 1)
    return int(stride)


def find_verification_images(dm_hparams: dict, limit: int = 4) -> list[Path]:
    """Up to ``limit`` images of the checkpoint's training dataset, when its folder can be found here."""
    from ..data.registry import DATASETS, data_dir

    dataset = str(dm_hparams.get("dataset") or "")
    candidates: list[Path] = []
    if dm_hparams.get("root"):
        candidates.append(Path(str(dm_hparams["root"])).expanduser() / "images")
    if dataset in DATASETS:
        candidates.append(data_dir(dm_hparams.get("data_dir")) / DATASETS[dataset].folder / "images")
    elif dataset:
        candidates.append(Path(dataset).expanduser() / "images")
    for folder in candidates:
        if folder.is_dir():
            files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_EXTENSIONS))
            if files:
                return files[:limit]
    return []


def _expand_inputs(paths: Sequence[str | os.PathLike], limit: int = 8) -> list[Path]:
    """Files given by --verify-input (folders contribute their first images)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.iterdir() if f.is_file() and f.name.lower().endswith(IMAGE_EXTENSIONS))[:limit]
        elif p.is_file():
            out.append(p)
        else:
            raise ExportError(f"--verify-input {p}: no such file or folder")
    return out[:limit]


def _image_batch(files: Sequence[Path], size: int) -> torch.Tensor:
    """Real images as the network takes them: squashed to size x size, float [0, 1], (B, 3, S, S)."""
    arrays = []
    for f in files:
        try:
            arrays.append(resize_image(read_image(f), size))
        except DataError as e:
            raise ExportError(f"--verify-input: {e}") from e
    x = np.stack(arrays).astype(np.float32) / 255.0
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


def _verification_inputs(size: int, dynamic: bool, multiple: int, max_size: int,
                         real: Sequence[Path]) -> list[tuple[str, torch.Tensor]]:
    """Named input batches: random (batch 3 and 1, unlike the batch of 2 that is traced), real images, and
    for a dynamic size also other, non-square sizes and the largest supported one."""
    g = torch.Generator().manual_seed(0)
    sets = [("random", torch.rand(3, 3, size, size, generator=g)), ("random batch 1", torch.rand(1, 3, size, size, generator=g))]
    if dynamic:
        top = max_size // multiple * multiple
        other = [(max(multiple, (size // 2) // multiple * multiple), size + 2 * multiple), (size + multiple, size),
                 (size + 3 * multiple, size + 5 * multiple), (top, top)]
        for h, w in other:
            sets.append((f"random {h}x{w}", torch.rand(1 if h * w > 4 * size * size else 2, 3, h, w, generator=g)))
    if real:
        sets.append((f"real images ({len(real)})", _image_batch(real, size)))
        if dynamic:
            s2 = size + 2 * multiple
            sets.append((f"real images at {s2}x{s2}", _image_batch(real, s2)))
    return sets


def _metadata(hp: dict, source: str, size: int, dynamic: bool, multiple: int) -> dict[str, str]:
    """The file metadata (:mod:`.metadata`) from a checkpoint's model hyper-parameters ``hp``."""
    return {
        "lesion_kd_version": __version__,
        "network": str(hp.get("network", "unet")),
        "num_classes": str(hp.get("num_classes", 2)),
        "in_channels": str(hp.get("in_channels", 3)),
        "image_size": str(size),
        "dynamic_size": "true" if dynamic else "false",
        "size_multiple": str(multiple),
        "input_normalisation": md.INPUT_NORMALISATION,
        "input": md.INPUT_DESCRIPTION,
        "output": md.OUTPUT_DESCRIPTION,
        "source_checkpoint": source,
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def network_metadata(network: str, size: int, net: nn.Module, num_classes: int = 2, dynamic: bool = False,
                     source: str = "none (not from a checkpoint)") -> dict[str, str]:
    """Metadata for :func:`export_network` of a network built by name (no checkpoint)."""
    return _metadata({"network": network, "num_classes": num_classes}, source, size, dynamic, _size_multiple(net))


def _dynamic_shapes(dynamic: bool, max_size: int, multiple: int) -> tuple[dict, ...]:
    batch = torch.export.Dim("batch", min=1, max=4096)
    dims: dict = {0: batch}
    if dynamic:
        hi = max(2, max_size // multiple)
        dims[2] = multiple * torch.export.Dim("height_blocks", min=1, max=hi)
        dims[3] = multiple * torch.export.Dim("width_blocks", min=1, max=hi)
    return (dims,)


def _export_onnx(net: nn.Module, tmp: Path, example: torch.Tensor, dynamic: bool, max_size: int, multiple: int,
                 levels: int, meta: dict[str, str],
                 step: Callable[[str], None] = lambda _: None) -> Callable[[torch.Tensor], np.ndarray]:
    """Write the ONNX file to ``tmp``; return a function running it in onnxruntime (for verification)."""
    step("loading the ONNX exporter (onnx, onnxscript, onnxruntime)")
    onnx = _require("onnx", "ONNX export")
    _require("onnxscript", "ONNX export (torch.onnx's exporter)")
    ort = _require("onnxruntime", "Verifying an ONNX export")
    with export_scan_formulation(levels, polymorphic=dynamic), torch.no_grad(), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and fallback chatter
        # torch.export first, by hand: its error is then the real one (torch.onnx.export would retry other
        # capture strategies and report the last failure), and it is much faster with symbolic sizes.
        step("torch.export: capturing the network's graph")
        try:
            exported = torch.export.export(net, (example,), dynamic_shapes=_dynamic_shapes(dynamic, max_size, multiple))
        except Exception as e:  # noqa: BLE001 - torch.export raises many types; say which step failed
            raise ExportError(f"torch.export failed: {type(e).__name__}: {str(e)[:2000]}") from e
        step("torch.onnx: translating the graph to ONNX and optimising it")
        try:
            program = torch.onnx.export(exported, (example,), dynamo=True, input_names=[md.INPUT_NAME],
                                        output_names=[md.OUTPUT_NAME], optimize=True, verbose=False)
        except Exception as e:  # noqa: BLE001 - the ONNX translation raises many types; say which step failed
            raise ExportError(f"torch.onnx.export failed: {type(e).__name__}: {str(e)[:2000]}") from e
    shape = program.model.graph.inputs[0].shape  # name the symbolic axes after what they are
    names = {0: "batch", 2: "height", 3: "width"} if dynamic else {0: "batch"}
    program.rename_axes({shape[i]: name for i, name in names.items() if not isinstance(shape[i], int)})
    model = program.model_proto
    del model.metadata_props[:]
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(tmp))
    step("onnxruntime: loading the exported model")
    options = ort.SessionOptions()
    threads = os.environ.get("OMP_NUM_THREADS", "")
    options.intra_op_num_threads = int(threads) if threads.isdigit() else 0
    session = ort.InferenceSession(str(tmp), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {md.INPUT_NAME: x.numpy()})[0]


def _export_torchscript(net: nn.Module, tmp: Path, example: torch.Tensor, dynamic: bool, levels: int,
                        meta: dict[str, str],
                        step: Callable[[str], None] = lambda _: None) -> Callable[[torch.Tensor], np.ndarray]:
    """Write the TorchScript file to ``tmp`` (metadata as the extra file lesion_kd.json); return a runner.

    A fixed size keeps the model's own chunked scan: run by torch it is about twice as fast as the
    GEMM-based export formulation (which suits onnxruntime); a dynamic size needs the shape-polymorphic one.
    """
    formulation = export_scan_formulation(levels, polymorphic=True) if dynamic else contextlib.nullcontext()
    step("torch.jit.trace: tracing and freezing the network")
    with formulation, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape arithmetic is traced on purpose
        warnings.simplefilter("ignore", FutureWarning)  # "torch.jit is deprecated": still the TorchScript format
        try:
            traced = torch.jit.freeze(torch.jit.trace(net, example, check_trace=False))
        except Exception as e:  # noqa: BLE001 - tracing raises many types; say which step failed
            raise ExportError(f"torch.jit.trace failed: {type(e).__name__}: {str(e)[:2000]}") from e
    step("torch.jit: saving and loading the traced module back")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "torch.jit is deprecated": still the TorchScript format
        torch.jit.save(traced, str(tmp), _extra_files={md.TORCHSCRIPT_METADATA_FILE: json.dumps(meta, indent=1)})
        loaded = torch.jit.load(str(tmp), map_location="cpu")

    def run(x: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return loaded(x).float().numpy()

    return run


def export_student(
    ckpt: str | os.PathLike,
    fmt: str,
    out: str | os.PathLike,
    size: int | None = None,
    dynamic_size: bool = False,
    max_size: int = 2048,
    tolerance: float = 1e-4,
    verify_inputs: Sequence[str | os.PathLike] | None = None,
    log: Callable[[str], None] = _say,
) -> ExportReport:
    """Export the student of ``ckpt`` as ``fmt`` ("onnx" or "torchscript") to ``out``; see the module docstring.

    Args:
        size: the fixed input side (or, with ``dynamic_size``, the default inference size recorded in the
            metadata); default: the checkpoint's training image size, else 256.
        dynamic_size: accept any height and width that are multiples of the network's stride.
        max_size: the largest side a dynamic-size export must handle correctly.
        tolerance: the largest accepted |logit difference| to eager PyTorch.
        verify_inputs: image files or folders for the real-image check (default: the checkpoint's
            training dataset, when its folder is found).
    """
    t0 = time.perf_counter()
    ckpt, out = Path(ckpt), Path(out)
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if not ckpt.is_file():
        raise ExportError(f"--ckpt {ckpt}: file not found")
    if tolerance <= 0:
        raise ExportError(f"--tolerance {tolerance}: must be > 0")
    log(f"loading the student of {ckpt}")
    hp, dm_hp = _load_checkpoint_hparams(ckpt)
    from ..models.loading import load_student  # torch and the networks; only the plain network is kept

    net = load_student(str(ckpt), map_location="cpu").float().eval()
    multiple = _size_multiple(net)
    size = int(size) if size else checkpoint_image_size(dm_hp)
    if size <= 0 or size % multiple:
        raise ExportError(f"--size {size}: must be a positive multiple of {multiple} (the {hp.get('network')} stride)")
    if dynamic_size and max_size < size:
        raise ExportError(f"--max-size {max_size}: smaller than --size {size}")
    real = _expand_inputs(verify_inputs) if verify_inputs else find_verification_images(dm_hp)
    if not real:
        log("warning: no real images found for verification (the checkpoint's dataset folder is not here); "
            "verifying on random inputs only. Pass --verify-input DIR to check on real images.")
    meta = _metadata(hp, ckpt.name, size, dynamic_size, multiple)
    log(f"exporting {hp.get('network')} from {ckpt} to {fmt} "
        f"({'dynamic size, default ' if dynamic_size else 'fixed size '}{size}x{size}, dynamic batch)")
    report = export_network(net, fmt, out, size, meta, dynamic_size, max_size, tolerance, real, log)
    report.seconds = time.perf_counter() - t0
    log(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB; max |logit diff| {report.max_abs_diff:.2e} "
        f"<= {tolerance:g}) in {report.seconds:.0f} s")
    return report


def export_network(
    net: nn.Module,
    fmt: str,
    out: str | os.PathLike,
    size: int,
    meta: dict[str, str],
    dynamic_size: bool = False,
    max_size: int = 2048,
    tolerance: float = 1e-4,
    real: Sequence[Path] = (),
    log: Callable[[str], None] = _say,
) -> ExportReport:
    """Export an eval-mode network (any registered one) with metadata ``meta``: trace, verify, write atomically.

    The core of :func:`export_student`, also used by the deployment benchmark for networks without a
    checkpoint. ``real``: image files for the real-image check.
    """
    out = Path(out)
    step = _Steps(log)
    multiple = int(meta.get("size_multiple") or _size_multiple(net))
    if dynamic_size:  # the scan's recursion depth covers sides up to this, no further
        meta["max_size"] = str(max_size)
    example = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1))  # batch 2: 1 is specialised
    report = ExportReport(out, fmt, meta)
    # written to a temporary file beside `out`, renamed into place only once verified (removed on any failure)
    with atomic_path(out) as tmp:
        # Recursion depth of the scan wherever the length is not a plain int: under torch.export with a
        # dynamic size, and always under torch.jit.trace (its shapes are traced values, not ints).
        levels = levels_for(longest_scan(net, max_size if dynamic_size else size, probe=2 * multiple))
        if fmt == "onnx":
            run = _export_onnx(net, tmp, example, dynamic_size, max_size, multiple, levels, meta, step)
        else:
            run = _export_torchscript(net, tmp, example, dynamic_size, levels, meta, step)
        checks = _verification_inputs(size, dynamic_size, multiple, max_size, real)
        step(f"verifying the export against eager PyTorch on {len(checks)} input sets")
        for name, x in checks:
            with torch.no_grad():
                ref = net(x).float().numpy()
            got = run(x)
            if got.shape != ref.shape:
                raise ExportError(f"{out}: refusing to write: the export returned {got.shape} for {name}, eager {ref.shape}")
            diff = float(np.abs(got - ref).max())
            agree = float((got.argmax(1) == ref.argmax(1)).mean())
            report.checks.append(VerifyCheck(name, tuple(x.shape), diff, agree))
            log(f"  verify {name:<26} {str(tuple(x.shape)):<20} max |logit diff| {diff:.2e}   mask agreement {agree:.6f}")
        if not report.max_abs_diff <= tolerance:  # also refuses NaN
            raise ExportError(f"{out}: refusing to write: the export differs from eager PyTorch by "
                              f"{report.max_abs_diff:.3e} > tolerance {tolerance:g} (max |logit difference|)")
        meta.update(verified_max_abs_diff=f"{report.max_abs_diff:.3e}", verified_tolerance=f"{tolerance:g}")
        step("writing the verified file")
        if fmt == "onnx":  # the final metadata, then the rename: nothing half-written ever sits at `out`
            onnx = _require("onnx", "ONNX export")
            model = onnx.load(str(tmp))
            for entry in model.metadata_props:
                entry.value = meta.get(entry.key, entry.value)
            for key in ("verified_max_abs_diff", "verified_tolerance"):
                entry = model.metadata_props.add()
                entry.key, entry.value = key, meta[key]
            onnx.save(model, str(tmp))
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                loaded = torch.jit.load(str(tmp), map_location="cpu")
                torch.jit.save(loaded, str(tmp), _extra_files={md.TORCHSCRIPT_METADATA_FILE: json.dumps(meta, indent=1)})
    return report
