"""Eval-mode BatchNorm statistics against the activations they normalise (a diagnostic, not a timing).

For a checkpoint and 16 Kvasir-SEG images (the first 16 files, 160x160), each network in the checkpoint
(``net.``, and ``net2.`` where the method trains a second one) is run three ways and its Dice against the
ground truth printed: eval mode (running statistics, no dropout: how the suite evaluates), eval-mode
BatchNorm with dropout on (the activations the running statistics were gathered from), and train mode
(batch statistics). Then, per BatchNorm layer, the gap between the eval-mode batch statistics and the
running ones (mean gap in batch standard deviations; variance ratio batch/running): a ratio far under 1
after a dropout layer is the dropout variance shift (Li et al., CVPR 2019)::

    python benchmarks/bn_shift.py runs/reproduce/cpu/kvasir-seg/cps-unet-10pct-seed0/lightning_logs/version_0/checkpoints/last.ckpt

With ``--split RUN/split.json`` (the run's own split), the first network is also scored on the split's validation
and test images (160x160, as the suite evaluates) as trained, then again after its BatchNorm running statistics
are re-estimated over training images (the labeled and the first 200 unlabeled ones, unaugmented) with dropout
off ("precise BN"): how much of its test Dice the shift costs.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from lesion_kd.models import build_model


def kvasir(root: Path, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` Kvasir-SEG images (by file name) and their masks."""
    folder = root / "Kvasir-SEG"
    return load_ids(folder, [f.stem for f in sorted((folder / "images").iterdir())[:n]])


def dice(logits: torch.Tensor, y: torch.Tensor) -> float:
    p = logits.argmax(1).bool()
    inter = (p & y).flatten(1).sum(1).float()
    return (2 * inter / (p.flatten(1).sum(1) + y.flatten(1).sum(1)).clamp(min=1)).mean().item()


def load_ids(root: Path, ids: list[str], size: int = 160) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and masks of a split's ids (a registry dataset folder with images/ and masks/)."""
    def one(i: str) -> tuple[torch.Tensor, torch.Tensor]:
        img = next(f for f in (root / "images").glob(f"{i}.*"))
        x = torch.from_numpy(np.array(Image.open(img).convert("RGB").resize((size, size)))).permute(2, 0, 1).float() / 255
        y = torch.from_numpy(np.array(Image.open(root / "masks" / f"{i}.png").convert("L").resize((size, size), Image.NEAREST)) > 127)
        return x, y
    xs, ys = zip(*(one(i) for i in ids), strict=True)
    return torch.stack(xs), torch.stack(ys)


def split_scores(net: nn.Module, tag: str, data: dict) -> None:
    set_mode(net, False, False)
    with torch.no_grad():
        for name in ("val", "test"):
            x, y = data[name]
            lo = torch.cat([net(x[i:i + 10]) for i in range(0, len(x), 10)])
            per = np.array([dice(lo[j:j + 1], y[j:j + 1]) for j in range(len(x))])
            p = lo.argmax(1)
            print(f"  {tag:<30} {name:<4} Dice {per.mean():.4f}  under 0.1: {int((per < 0.1).sum()):>2}  empty: "
                  f"{int((p.flatten(1).sum(1) == 0).sum()):>2}  lesion share {p.float().mean():.3f} (truth {y.float().mean():.3f})")


def precise_bn(net: nn.Module, split: dict, root: Path, data: dict) -> None:
    split_scores(net, "as trained (eval mode)", data)
    x, _ = load_ids(root, split["labeled"] + split["unlabeled"][:200])
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the passes below
    set_mode(net, True, False)
    with torch.no_grad():
        for i in range(0, len(x), 16):
            net(x[i:i + 16])
    split_scores(net, "BN re-estimated, dropout off", data)


def set_mode(net: nn.Module, bn_train: bool, dropout_train: bool) -> None:
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train(bn_train)
        elif isinstance(m, nn.modules.dropout._DropoutNd):
            m.train(dropout_train)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--split", type=Path, default=None, help="the run's split.json: score val/test, then precise BN")
    ap.add_argument("--root", type=Path, default=Path(os.environ.get("LESION_KD_DATA", "../shared/datasets")))
    args = ap.parse_args()
    ck = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    hp = ck.get("hyper_parameters", {})
    x, y = kvasir(args.root)
    print(f"{args.checkpoint}: step {ck.get('global_step')}, 16 Kvasir-SEG images, ground-truth lesion share "
          f"{y.float().mean():.3f}")
    for prefix in ("net.", "net2."):
        state = {k[len(prefix):]: v for k, v in ck["state_dict"].items() if k.startswith(prefix)}
        if not state:
            continue
        net = build_model(hp.get("network", "unet"), in_channels=hp.get("in_channels", 3),
                          num_classes=hp.get("num_classes", 2), **(hp.get("network_kwargs") or {}))
        net.load_state_dict(state)
        torch.manual_seed(0)
        with torch.no_grad():
            for label, bn_train, drop_train in (("eval mode", False, False), ("eval BN, dropout on", False, True),
                                                ("batch statistics", True, True)):
                set_mode(net, bn_train, drop_train)
                lo = net(x)
                print(f"  {prefix:<5} {label:<20} Dice {dice(lo, y):.3f}  predicted lesion share "
                      f"{lo.argmax(1).float().mean():.3f}")
        rows = []

        def hook(name, rows=rows):
            def f(mod, inp, out):
                a = inp[0].transpose(0, 1).flatten(1)
                rows.append((name, ((a.mean(1) - mod.running_mean).abs() / a.var(1).sqrt().clamp(min=1e-6)).mean(),
                             (a.var(1) / mod.running_var).mean()))
            return f

        hooks = [m.register_forward_hook(hook(n)) for n, m in net.named_modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        set_mode(net, False, False)
        with torch.no_grad():
            net(x)
        for h in hooks:
            h.remove()
        for name, gap, ratio in rows:
            print(f"    {prefix}{name:<32} mean gap {gap:.2f} std, variance batch/running {ratio:.2f}")
        if args.split is not None and prefix == "net.":
            split = json.loads(args.split.read_text())
            root = Path(split["root"])
            data = {k: load_ids(root, split[k]) for k in ("val", "test")}
            precise_bn(net, split, root, data)


if __name__ == "__main__":
    main()
