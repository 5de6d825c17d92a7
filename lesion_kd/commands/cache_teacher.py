"""``lesion-kd cache-teacher``: fill the teacher's embedding cache for the images an experiment uses.

Reads the ``data:`` section (and ``model.init_args.teacher*`` if present) of the same composed configs
that ``fit`` takes, so ``lesion-kd cache-teacher --config exp.yaml`` caches exactly what ``fit`` will need.
Interrupt it at any time: finished entries are kept and the next call resumes. ``--encoder hybrid`` fills
about 2x faster per image on the CPU, into its own cache folder (see :mod:`lesion_kd.teacher_cache`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml


def _merge(dst: dict, src: dict) -> dict:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v
    return dst


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="lesion-kd cache-teacher", description=__doc__.splitlines()[0])
    p.add_argument("--config", action="append", default=[], help="experiment config(s), composed in order")
    p.add_argument("--teacher", default=None, help="teacher backend (litemedsam, medsam); default: from config or litemedsam")
    p.add_argument("--checkpoint", default=None, help="teacher checkpoint (needed for medsam)")
    p.add_argument("--splits", nargs="+", default=["train"], choices=["train", "val", "test"],
                   help="which splits to cache (default: train, the images distillation sees)")
    p.add_argument("--cache_dir", default=None, help="teacher cache directory (default $LESION_KD_CACHE/teacher)")
    p.add_argument("--encoder", default=None, choices=["torch", "onnx", "hybrid"],
                   help="how the image encoder runs: torch (the teacher's PyTorch module, the entries training "
                        "reads by default), onnx (onnxruntime fp32) or hybrid (litemedsam: about 2x faster, "
                        "bf16 transformer GEMMs, own cache folder; training reads it only with "
                        "LESION_KD_TEACHER_ENCODER=hybrid). Default: $LESION_KD_TEACHER_ENCODER, else torch")
    p.add_argument("--rank", type=int, default=0, help="this process's share: entries i with i %% world_size == rank")
    p.add_argument("--world_size", type=int, default=1, help="number of processes filling the cache together")
    args = p.parse_args(argv)

    cfg: dict = {}
    for path in args.config:
        if not Path(path).is_file():
            p.error(f"--config {path}: file not found")
        _merge(cfg, yaml.safe_load(Path(path).read_text()) or {})
    from ..data import LesionDataModule
    from ..teacher_cache import fill_teacher_cache

    data_cfg = dict(cfg.get("data") or {})
    data_cfg.pop("augmentation", None)
    model_args = ((cfg.get("model") or {}).get("init_args") or {})
    teacher = args.teacher or model_args.get("teacher") or "litemedsam"
    checkpoint = args.checkpoint or model_args.get("teacher_checkpoint")
    dm = LesionDataModule(**data_cfg)
    dm.setup()
    samples = [s for split in args.splits for s in dm.splits[split]]
    cache = fill_teacher_cache(samples, dm.dataset_name, teacher, checkpoint, args.cache_dir, args.rank, args.world_size,
                               encoder=args.encoder)
    print(f"teacher cache ready: {len(samples)} images of {dm.dataset_name} ({', '.join(args.splits)}) in {cache.dir}")
    return 0
