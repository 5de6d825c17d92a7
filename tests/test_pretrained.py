"""The trained students shipped inside the package (lesion_kd/pretrained/): index, weights, model cards,
``lesion-kd segment --list-models`` and ``--model NAME``, and each card's 20-image Dice recomputed from the
shipped weights on the real test images."""

from __future__ import annotations

import csv
import hashlib
import json
import re
import shutil
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lesion_kd import pretrained
from lesion_kd.commands import segment as segment_cmd
from lesion_kd.pretrained.evaluate import committed_test_ids, fixed_eval_ids, segment_dice

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ("kvasir-seg", "busi")
MODELS = pretrained.list_models()


def test_both_datasets_are_shipped():
    assert [m["name"] for m in MODELS] == list(SHIPPED)


@pytest.mark.parametrize("entry", MODELS, ids=lambda m: m["name"])
def test_weights_card_and_index_agree(entry):
    weights = pretrained.PRETRAINED_DIR / entry["file"]
    data = weights.read_bytes()
    assert len(data) == entry["bytes"] <= 10 * 1024 * 1024
    assert hashlib.sha256(data).hexdigest() == entry["sha256"] and pretrained.verify_sha256(entry["name"])
    assert entry["network"] == "mamba_unet" and entry["method"] == "semikd_sup" and entry["labeled_fraction"] == 1.0
    # the fixed images: the first 20 ids of the committed test split, sorted
    split = REPO / entry["split"]["file"]
    assert entry["fixed_eval"]["ids"] == fixed_eval_ids(committed_test_ids(split)) and len(entry["fixed_eval"]["ids"]) == 20
    card = (pretrained.PRETRAINED_DIR / entry["card"]).read_text()
    t = entry["test"]
    for fact in (f"{100 * t['dice']:.2f}", f"{t['hd95']:.2f} px", entry["command"], entry["sha256"],
                 f"{entry['image_size']}x{entry['image_size']}", "Not a medical device", "semikd_sup",
                 entry["licence"]["citation"], entry["licence"]["weights_terms"], *entry["fixed_eval"]["ids"]):
        assert fact in card, fact
    if "hd95_pooled" in t:
        assert f"{t['hd95_pooled']:.2f} px" in card
    figure = re.search(r"Mean Dice on the 20 fixed test images: \*\*([0-9.]+)\*\*", card)
    assert figure and abs(float(figure.group(1)) - 100 * entry["fixed_eval"]["mean_dice"]) < 0.006


def test_package_data_carries_every_shipped_file():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["lesion_kd.pretrained"]
    for name in [pretrained.INDEX_NAME] + [f for m in MODELS for f in (m["file"], m["card"])]:
        assert any(fnmatch(name, p) for p in patterns), name
        assert (pretrained.PRETRAINED_DIR / name).is_file()


def test_list_models_prints_name_dataset_dice_size_licence(capsys):
    assert segment_cmd.main(["--list-models"]) == 0
    out = capsys.readouterr().out
    for m in MODELS:
        line = next(ln for ln in out.splitlines() if ln.startswith(m["name"] + " "))
        for fact in (m["dataset_title"], f"{100 * m['test']['dice']:.2f}", f"{m['bytes'] / 1e6:.1f} MB",
                     m["licence"]["short"]):
            assert fact in line, (fact, line)
    assert "not a medical device" in out


def test_list_models_needs_no_torch():
    code = ("import sys; from lesion_kd.commands.segment import main; rc = main(['--list-models']); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "kvasir-seg" in r.stdout and "busi" in r.stdout


def test_unknown_model_name_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tmp_path / "in" / "a.png")
    rc = segment_cmd.main(["--model", "kvasir", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                           "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "--model kvasir: not a file, and not the name of a shipped model" in err
    assert "kvasir-seg" in err and "busi" in err
    with pytest.raises(pretrained.UnknownModelError, match="shipped: kvasir-seg, busi"):
        pretrained.resolve_model("nope")


def test_missing_arguments_without_list_models(capsys):
    with pytest.raises(SystemExit):
        segment_cmd.main(["--model", "kvasir-seg"])
    assert "--input, --output (or --list-models)" in capsys.readouterr().err


def test_a_file_wins_over_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("kvasir-seg").write_bytes(b"not a model")
    assert pretrained.resolve_model("kvasir-seg") == Path("kvasir-seg")
    assert pretrained.resolve_model("busi") == pretrained.model_path("busi")
    Path("busi").mkdir()
    with pytest.raises(FileNotFoundError, match="not a file"):
        pretrained.resolve_model("busi")


def _sample_images(dst: Path, data_dir: Path | None) -> list[tuple[int, int]]:
    """Three images in ``dst``: real Kvasir-SEG test images when the data is here, else synthetic ones."""
    dst.mkdir()
    if data_dir is not None:
        ids = fixed_eval_ids(committed_test_ids(REPO / "experiments/splits/kvasir-seg_v1.json"))[:3]
        files = [next((data_dir / "Kvasir-SEG" / "images").glob(f"{i}.*")) for i in ids]
        for f in files:
            shutil.copyfile(f, dst / f.name)  # into the test's temp dir only
        return [Image.open(f).size[::-1] for f in files]
    sizes = [(300, 420), (256, 256), (97, 131)]
    rng = np.random.default_rng(0)
    for k, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(dst / f"img{k}.png")
    return sizes


@pytest.fixture
def maybe_data_dir():
    from helpers import real_data_dir

    return real_data_dir()


def test_model_by_name_segments_images(tmp_path, capsys, maybe_data_dir):
    sizes = _sample_images(tmp_path / "in", maybe_data_dir)
    rc = segment_cmd.main(["--model", "kvasir-seg", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                           "--no-progress", "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "model: pretrained kvasir-seg mamba_unet (kvasir-seg.pt) at 160x160" in out
    with open(tmp_path / "out" / "segments.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and all(r["status"] == "ok" for r in rows)
    for r, (h, w) in zip(rows, sizes, strict=True):
        mask = np.asarray(Image.open(tmp_path / "out" / f"{r['id']}_mask.png"))
        assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, 255}
        assert (tmp_path / "out" / f"{r['id']}_overlay.png").is_file()
    if maybe_data_dir is not None:  # real polyps: the student finds a lesion in each
        assert all(int(r["lesion_pixels"]) > 0 for r in rows)


def test_shipped_weights_load_as_a_student():
    import torch

    from lesion_kd.models.loading import load_student

    net = load_student(str(pretrained.model_path("kvasir-seg")))
    assert sum(p.numel() for p in net.parameters()) == MODELS[0]["parameters"]
    with torch.inference_mode():
        assert net(torch.rand(1, 3, 160, 160)).shape == (1, 2, 160, 160)


@pytest.mark.slow
@pytest.mark.parametrize("name", SHIPPED)
def test_card_dice_on_the_20_fixed_images(name, data_dir):
    entry = pretrained.get_model(name)
    result = segment_dice(name, entry["dataset"], entry["fixed_eval"]["ids"], data_root=data_dir)
    assert result["n_images"] == 20
    assert abs(100 * result["mean_dice"] - 100 * entry["fixed_eval"]["mean_dice"]) <= 0.5, (
        f"{name}: {100 * result['mean_dice']:.2f} recomputed, {100 * entry['fixed_eval']['mean_dice']:.2f} on the card")
    json.dumps(result)  # plain types
