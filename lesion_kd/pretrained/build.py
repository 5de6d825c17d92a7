"""Turn a finished training run into a shipped model: compact weights, an index entry and a model card.

    python -m lesion_kd.pretrained.build --run-dir runs/pretrained/kvasir-seg --command "lesion-kd fit ..."

Reads the run's best checkpoint, ``metrics.json`` (test Dice, HD95, hd95_pooled), ``config.yaml`` (the
recipe, checked to be the one the card states) and ``split.json``; writes, each atomically, into this
package folder

- ``<name>.pt``: the student's ``net.*`` tensors (float16 where a tensor survives the round trip within
  1e-3 of its largest magnitude, else float32) with the hyper-parameters that rebuild it: a minimal lesion-kd
  checkpoint (``load_student``, ``lesion-kd segment``, ``lesion-kd export --ckpt`` all read it);
- its entry of ``index.json`` (what ``lesion-kd segment --list-models`` and :mod:`lesion_kd.pretrained` read);
- ``<name>.md``: the model card, rendered from that same entry.

It also measures, with the written weights and through ``segment``'s own preprocessing, the mean Dice at
original resolution on all test images and on the card's 20 fixed test images (the figure
tests/test_pretrained.py recomputes), and the largest logit difference to the float32 checkpoint.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ..io_utils import atomic_write_bytes, atomic_write_text
from . import INDEX_NAME, PRETRAINED_DIR, _index
from .evaluate import FIXED_EVAL_COUNT, committed_test_ids, dataset_samples, fixed_eval_ids, segment_dice

MAX_BYTES = 10 * 1024 * 1024
ORDER = ("kvasir-seg", "busi")
FORMAT_VERSION = 1

# Terms of each dataset and what they mean for weights trained on it (checked against the publishers' pages
# and the data folders' SOURCE.txt: neither forbids distributing models trained on the data).
DATASET_TERMS: dict[str, dict[str, str]] = {
    "kvasir-seg": {
        "title": "Kvasir-SEG",
        "task": "polyp segmentation in colonoscopy images",
        "short": "research/education only, no commercial use; cite Jha et al. MMM 2020",
        "data_terms": ("Kvasir-SEG (Simula Research Laboratory): released for research and "
                       "educational use only; commercial use is forbidden without Simula's prior written "
                       "permission; publications must cite Jha et al., MMM 2020."),
        "weights_terms": ("The terms restrict the use of the data (research and education, no commercial use) and "
                          "ask for a citation; they do not forbid distributing models trained on it. These weights "
                          "are derived from Kvasir-SEG and are shipped under the same terms: research and "
                          "educational use only, no commercial use without Simula's permission, and cite Jha et al. "
                          "(below) in anything that uses them. They are not covered by lesion-kd's Apache-2.0 code "
                          "licence."),
    },
    "busi": {
        "title": "BUSI (Breast Ultrasound Images)",
        "task": "breast-lesion segmentation in ultrasound images",
        "short": "research use with citation (Al-Dhabyani et al. 2020; mirrors list CC0/'other')",
        "data_terms": ("BUSI (Al-Dhabyani et al., Data in Brief 2020): no licence file with the data; its mirrors "
                       "list the licence variously as CC0 (Kaggle) or 'other'. Treated here as research use with "
                       "citation of Al-Dhabyani et al. 2020."),
        "weights_terms": ("Nothing in the dataset's terms forbids distributing models trained on it. These weights "
                          "are derived from BUSI and are shipped under the same terms: research use, citing "
                          "Al-Dhabyani et al. 2020 (below) in anything that uses them. They are not covered by "
                          "lesion-kd's Apache-2.0 code licence."),
    },
}

METHOD_NOTE = (
    "semikd_sup (experiments/method/semikd_sup.yaml): the SemiKD student's own recipe with its supervised loss "
    "only: AdamW (lr 1e-3, weight decay 0.01), cosine schedule, the method's training views, L_sup; "
    "distillation (kd_mode none) and L_dss off. Why: with every training label used there is no unlabeled "
    "data, so the semi-supervised terms (L_dss and distillation on unlabeled views) have nothing to act on; "
    "the teacher-based terms (distillation from the MedSAM teacher on labeled views) were not compared at "
    "100% labels in this suite, so nothing says they would help here. semikd_sup is the measured L_sup-only "
    "ablation row of the method."
)
INTENDED_USE = ("Research only. Not a medical device: not for diagnosis, screening, treatment or any clinical "
                "decision, and not validated on data from other hospitals, devices or populations.")


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        if out.returncode != 0:
            return None
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def find_run(run_dir: Path) -> dict[str, Path]:
    """The files of the newest finished run under ``run_dir`` (a ``--trainer.default_root_dir``)."""
    candidates = sorted((p.parent for p in run_dir.glob("**/metrics.json")), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise FileNotFoundError(f"{run_dir}: no metrics.json (has the run finished its test?)")
    log_dir = candidates[-1]
    best = sorted(log_dir.glob("checkpoints/best-*.ckpt"))
    if len(best) != 1:
        raise FileNotFoundError(f"{log_dir}/checkpoints: expected one best-*.ckpt, found {len(best)}")
    files = {"log_dir": log_dir, "ckpt": best[0]}
    for name in ("metrics.json", "config.yaml", "split.json", "metrics.csv"):
        if not (log_dir / name).is_file():
            raise FileNotFoundError(f"{log_dir / name}: missing")
        files[name] = log_dir / name
    return files


def check_recipe(config: dict) -> None:
    """The run is the card's recipe: semikd_sup (L_sup only), all labels, the cpu profile."""
    init = config["model"]["init_args"]
    data, trainer = config["data"], config["trainer"]
    expected = {
        "model class": (config["model"]["class_path"], "lesion_kd.methods.SemiKDModule"),
        "network": (init["network"], "mamba_unet"), "kd_mode": (init["kd_mode"], "none"),
        "use_dss": (init["use_dss"], False), "optimizer": (init["optimizer"], "adamw"),
        "schedule": (init["schedule"], "cosine"), "labeled_fraction": (float(data["labeled_fraction"]), 1.0),
        "max_steps": (trainer["max_steps"], 2000), "image_size": (data["image_size"], 160),
    }
    wrong = [f"{k}={got!r} (expected {want!r})" for k, (got, want) in expected.items() if got != want]
    if wrong:
        raise ValueError("the run is not the recipe the card states: " + ", ".join(wrong))


def compact_state(state: dict) -> tuple[dict, list[str]]:
    """float16 copies of the float tensors that survive the round trip (every element within 1e-3 of the
    tensor's largest magnitude, and nothing overflows), float32 for the others (returned by name),
    everything else as is."""
    import torch

    out, kept = {}, []
    for k, v in state.items():
        if v.is_floating_point():
            v = v.detach().float()
            h = v.to(torch.float16)
            err = (h.float() - v).abs()
            if torch.isfinite(h).all() and float(err.max()) <= 1e-3 * float(v.abs().max()):
                out[k] = h.clone()
                continue
            kept.append(k)
            out[k] = v.clone()
        else:
            out[k] = v.clone()
    return out, kept


def val_dice_at(metrics_csv: Path, step: int) -> float | None:
    import csv

    with open(metrics_csv, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/dice")]
    # Lightning logs validation at step N as the step index N - 1 (after the N-th optimizer step)
    for r in rows:
        if int(r["step"]) in (step, step - 1):
            return float(r["val/dice"])
    return None


def _logit_diff(ckpt: Path, shipped: Path, samples: list) -> float:
    import torch

    from ..data.prep import load_and_check, resize_image
    from ..models.loading import load_student

    a, b = load_student(str(ckpt)).float().eval(), load_student(str(shipped)).float().eval()
    size = int(torch.load(shipped, map_location="cpu", weights_only=True)["datamodule_hyper_parameters"]["image_size"])
    imgs = np.stack([resize_image(load_and_check(s)[0], size) for s in samples]).astype(np.float32) / 255.0
    x = torch.from_numpy(imgs.transpose(0, 3, 1, 2).copy())
    with torch.inference_mode():
        return float((a(x) - b(x)).abs().max())


def build(run_dir: Path, command: str, name: str | None = None, data_root: str | None = None,
          split_file: Path | None = None, out_dir: Path = PRETRAINED_DIR, log=print) -> dict[str, Any]:
    import torch

    files = find_run(run_dir)
    config = yaml.safe_load(files["config.yaml"].read_text())
    check_recipe(config)
    dataset = config["data"]["dataset"]
    name = name or dataset
    terms = DATASET_TERMS[dataset]
    split = json.loads(files["split.json"].read_text())
    test_ids = list(split["test"])
    split_file = split_file or Path("experiments/splits") / f"{dataset}_v1.json"
    if split_file.is_file() and sorted(committed_test_ids(split_file)) != sorted(test_ids):
        raise ValueError(f"{files['split.json']}: its test ids are not those of the committed {split_file}")
    metrics = json.loads(files["metrics.json"].read_text())

    raw = torch.load(files["ckpt"], map_location="cpu", weights_only=True)
    hp = dict(raw.get("hyper_parameters") or {})
    net_state = {k: v for k, v in raw["state_dict"].items() if k.startswith("net.")}
    state, kept32 = compact_state(net_state)
    from ..models.loading import load_student

    n_params = int(sum(p.numel() for p in load_student(str(files["ckpt"])).parameters()))
    payload = {
        "state_dict": state,
        "hyper_parameters": {"network": hp["network"], "in_channels": int(hp.get("in_channels", 3)),
                             "num_classes": int(hp.get("num_classes", 2)),
                             "network_kwargs": hp.get("network_kwargs")},
        "datamodule_hyper_parameters": {"dataset": dataset, "image_size": int(config["data"]["image_size"])},
        "lesion_kd_pretrained": {"name": name, "format": FORMAT_VERSION, "source_checkpoint": files["ckpt"].name},
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    if len(data) > MAX_BYTES:
        raise ValueError(f"{name}: {len(data) / 1e6:.1f} MB of weights, above the {MAX_BYTES / 1e6:.1f} MB limit")
    weights = out_dir / f"{name}.pt"
    atomic_write_bytes(weights, data)
    log(f"wrote {weights} ({len(data) / 1e6:.2f} MB; {len(kept32)} tensors kept in float32)")

    eval_ids = fixed_eval_ids(test_ids)
    diff = _logit_diff(files["ckpt"], weights, dataset_samples(dataset, eval_ids, data_root))
    fixed = segment_dice(weights, dataset, eval_ids, data_root)
    fixed32 = segment_dice(files["ckpt"], dataset, eval_ids, data_root)  # the float32 checkpoint, for the card
    full = segment_dice(weights, dataset, sorted(test_ids), data_root)
    log(f"{name}: max |logit diff| to the float32 checkpoint {diff:.2e}; mean Dice {100 * fixed['mean_dice']:.2f} "
        f"on the {len(eval_ids)} fixed test images, {100 * full['mean_dice']:.2f} on all {full['n_images']}")
    step = int(files["ckpt"].stem.split("-")[-1])
    test = {"dice": metrics["dice"]["mean"], "dice_std": metrics["dice"]["std"], "iou": metrics["iou"]["mean"],
            "hd95": metrics["hd95"]["mean"], "hd95_std": metrics["hd95"]["std"], "asd": metrics["asd"]["mean"],
            "n_images": metrics["n_images"], "resolution": metrics.get("resolution", "model")}
    if "hd95_pooled" in metrics:
        test["hd95_pooled"] = metrics["hd95_pooled"]["mean"]
    from ..data.registry import DATASETS

    spec = DATASETS[dataset]
    entry = {
        "name": name,
        "file": weights.name,
        "card": f"{name}.md",
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "dataset": dataset,
        "dataset_title": terms["title"],
        "task": terms["task"],
        "network": hp["network"],
        "parameters": n_params,
        "num_classes": payload["hyper_parameters"]["num_classes"],
        "image_size": payload["datamodule_hyper_parameters"]["image_size"],
        "input": "RGB image of any size, squashed (not letterboxed) to image_size x image_size, scaled to [0, 1], "
                 "no mean/std normalisation; the softmax is resized back to the image's own size",
        "weights_dtype": "float16" + (f" ({len(kept32)} tensors float32)" if kept32 else ""),
        "max_abs_logit_diff_vs_float32": diff,
        "method": "semikd_sup",
        "method_note": METHOD_NOTE,
        "labeled_fraction": 1.0,
        "seed": int(config["seed_everything"]),
        "split": {"file": f"experiments/splits/{split_file.name}", "train": len(split["labeled"]),
                  "val": len(split["val"]), "test": len(test_ids)},
        "command": command,
        "best_step": step,
        "max_steps": int(config["trainer"]["max_steps"]),
        "val_dice": val_dice_at(files["metrics.csv"], step),
        "code_commit": _git_commit(),
        "test": test,
        "test_original_resolution": {"mean_dice": full["mean_dice"], "n_images": full["n_images"]},
        "fixed_eval": {"rule": f"the first {FIXED_EVAL_COUNT} ids of the committed test split, sorted "
                               f"(experiments/splits/{split_file.name})",
                       "ids": eval_ids, "mean_dice": fixed["mean_dice"], "per_image": fixed["per_image"],
                       "float32_checkpoint_mean_dice": fixed32["mean_dice"],
                       "resolution": "original", "tta": False},
        "licence": {"short": terms["short"], "data_terms": terms["data_terms"],
                    "weights_terms": terms["weights_terms"], "homepage": spec.homepage, "citation": spec.citation},
        "intended_use": INTENDED_USE,
    }
    write_entry(entry, out_dir)
    atomic_write_text(out_dir / entry["card"], render_card(entry))
    log(f"wrote {out_dir / entry['card']} and {out_dir / INDEX_NAME}")
    return entry


def write_entry(entry: dict[str, Any], out_dir: Path = PRETRAINED_DIR) -> None:
    path = out_dir / INDEX_NAME
    models = json.loads(path.read_text())["models"] if path.is_file() else []
    models = [m for m in models if m["name"] != entry["name"]] + [entry]
    models.sort(key=lambda m: (ORDER.index(m["name"]) if m["name"] in ORDER else len(ORDER), m["name"]))
    index = {"format": FORMAT_VERSION,
             "about": "Trained students shipped with lesion-kd; written by python -m lesion_kd.pretrained.build. "
                      "Research use only, not a medical device; each model's data terms apply to its weights.",
             "models": models}
    atomic_write_text(path, json.dumps(index, indent=1) + "\n")
    _index.cache_clear()


def fixed_eval_line(entry: dict[str, Any]) -> str:
    """The card's line with the 20-image figure (tests/test_pretrained.py reads it back)."""
    fe = entry["fixed_eval"]
    return (f"Mean Dice on the {len(fe['ids'])} fixed test images: **{100 * fe['mean_dice']:.2f}** "
            "(the shipped weights through `lesion-kd segment`'s preprocessing, at each image's own resolution, no TTA)")


def _fixed_note(e: dict[str, Any]) -> str:
    """For ids that carry a category prefix (BUSI: benign_NNN, malignant_NNN), how many of each the fixed
    images hold: sorting by id does not sample the categories evenly."""
    cats = [i.split("_")[0] for i in e["fixed_eval"]["ids"] if "_" in i]
    if len(cats) != len(e["fixed_eval"]["ids"]):
        return ""
    counts = ", ".join(f"{cats.count(c)} {c}" for c in sorted(set(cats)))
    return f"\n  Sorted by id, they are {counts} images, not a sample of the test set's categories."


def render_card(e: dict[str, Any]) -> str:
    t, lic, sp = e["test"], e["licence"], e["split"]
    pooled = f"; pooled (MedPy's one 95th percentile of both directions): {t['hd95_pooled']:.2f} px" \
        if "hd95_pooled" in t else ""
    ids = ", ".join(f"`{i}`" for i in e["fixed_eval"]["ids"])
    val = f"{100 * e['val_dice']:.2f}" if e.get("val_dice") is not None else "n/a"
    commit = f"(The build ran at commit `{e['code_commit'][:12]}`.)" if e.get("code_commit") else ""
    return f"""# Model card: `{e['name']}`, a Mamba U-Net student for {e['task']}

**{e['intended_use']}**

Use it by name: `lesion-kd segment --model {e['name']} --input DIR --output DIR`
(`lesion-kd segment --list-models` lists every shipped model).

| | |
|---|---|
| Weights | `{e['file']}`, {e['bytes'] / 1e6:.2f} MB, sha256 `{e['sha256']}` |
| Storage | {e['weights_dtype']} (computed in float32; largest logit difference to the float32 checkpoint on the fixed images: {e['max_abs_logit_diff_vs_float32']:.1e}) |
| Network | `{e['network']}` ({e['parameters']:,} parameters), {e['num_classes']} classes (0 background, 1 lesion) |
| Input | {e['input']}; input size {e['image_size']}x{e['image_size']} |
| Training data | {e['dataset_title']}: all {sp['train']} training images, every one labeled; validation {sp['val']}, test {sp['test']} (committed split `{sp['file']}`) |
| Method | `{e['method']}`, seed {e['seed']}, {e['max_steps']} steps, best checkpoint by validation Dice (step {e['best_step']}, val Dice {val}) |

## Method, and why this one

{e['method_note']}

## Exact training command

```
{e['command']}
```

The weights, this card and the index entry were then written by
`python -m lesion_kd.pretrained.build --run-dir <that run> --command "<the command>"`. {commit}

## Results

On the {t['n_images']} test images of the committed split, from the training run's own test
(`metrics.json`, at the model's input size {e['image_size']}x{e['image_size']}):

- Dice: **{100 * t['dice']:.2f}** (std {100 * t['dice_std']:.2f}); IoU {100 * t['iou']:.2f}
- HD95: **{t['hd95']:.2f} px** per-image mean at {e['image_size']}x{e['image_size']} (std {t['hd95_std']:.2f}){pooled}; ASD {t['asd']:.2f} px

With the shipped weights, through `lesion-kd segment`'s preprocessing, each mask compared with the ground
truth at the image's own resolution:

- Mean Dice on all {e['test_original_resolution']['n_images']} test images: {100 * e['test_original_resolution']['mean_dice']:.2f}
- {fixed_eval_line(e)}; the float32 checkpoint the weights were stored from: {100 * e['fixed_eval']['float32_checkpoint_mean_dice']:.2f}.
  The fixed images are {e['fixed_eval']['rule']}: {ids}.{_fixed_note(e)}
  The figure is a fixed check of the shipped weights; the test Dice above is the accuracy estimate.
  tests/test_pretrained.py recomputes this figure from the shipped weights (within 0.5 points).

## Data terms, and the terms of these weights

- Data: {lic['data_terms']} ({lic['homepage']})
- Weights: {lic['weights_terms']}
- Cite: {lic['citation']}

## Intended use and limitations

{e['intended_use']} Trained on {sp['train']} images of one public dataset at {e['image_size']}x{e['image_size']}:
expect lower accuracy on images from other devices, sites or acquisition settings, and on lesions much
smaller than the training ones (fine boundaries are lost at this input size). The model segments one
lesion class; it does not say whether an image contains a lesion at all, and it was trained only on
images that do.
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lesion_kd.pretrained.build", description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", required=True, help="the run's --trainer.default_root_dir")
    p.add_argument("--command", required=True, help="the exact training command (written on the card)")
    p.add_argument("--name", default=None, help="the model's name (default: the dataset's)")
    p.add_argument("--data-dir", default=None, help="datasets folder (default: $LESION_KD_DATA)")
    p.add_argument("--out-dir", default=str(PRETRAINED_DIR), help="where to write (default: this package folder)")
    args = p.parse_args(argv)
    try:
        build(Path(args.run_dir), args.command, args.name, args.data_dir, out_dir=Path(args.out_dir))
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"build: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
