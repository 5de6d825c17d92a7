"""Deployment: the export scan formulation, ``lesion-kd export`` (ONNX, TorchScript) and ``lesion-kd segment``.

Fast tests use the export formulation directly and a numpy stand-in model; the slow ones train one smoke
Mamba student (module fixture), export it and segment real Kvasir-SEG images and a mixed folder with it.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lesion_kd.deploy.export_scan import export_scan_formulation, levels_for, selective_scan_export
from lesion_kd.deploy.segment import Predictor, predict_probabilities, segment_images
from lesion_kd.models import scan as scan_mod
from lesion_kd.models.scan import selective_scan_ref

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------
# The export formulation of the scan
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("polymorphic", [False, True])
@pytest.mark.parametrize("b,d,L,n,g", [(2, 16, 77, 8, 4), (1, 8, 1, 4, 1), (2, 8, 64, 4, 1), (1, 8, 513, 8, 2)])
def test_export_scan_matches_the_sequential_reference(b, d, L, n, g, polymorphic):
    gen = torch.Generator().manual_seed(L)
    u, delta, z = (torch.randn(b, d, L, generator=gen) for _ in range(3))
    A = -torch.rand(d, n, generator=gen) * 5
    B = torch.randn(*((b, g, n, L) if g > 1 else (b, n, L)), generator=gen)
    C = torch.randn(B.shape, generator=gen)
    D, bias = torch.randn(d, generator=gen), torch.randn(d, generator=gen)
    ref = selective_scan_ref(u, delta, A, B, C, D, z, bias, delta_softplus=True)
    out = selective_scan_export(u, delta, A, B, C, D, z, bias, True, levels=levels_for(L), polymorphic=polymorphic)
    assert torch.allclose(out, ref, atol=5e-5, rtol=1e-5), (out - ref).abs().max()


def test_export_scan_handles_decays_far_below_float32_precision():
    # very large steps: exp(delta * A) underflows; the clamped formulation must stay finite and exact
    u = torch.randn(1, 4, 40)
    delta = torch.full((1, 4, 40), 30.0)
    A = -torch.rand(4, 8) * 10 - 1
    B, C = torch.randn(1, 8, 40), torch.randn(1, 8, 40)
    out = selective_scan_export(u, delta, A, B, C)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, selective_scan_ref(u, delta, A, B, C), atol=1e-4)


def test_levels_cover_the_sequence_length():
    assert [levels_for(x) for x in (1, 8, 9, 64, 65, 256, 4096)] == [1, 1, 2, 2, 3, 3, 4]


def test_export_formulation_is_restored_after_an_error():
    original = scan_mod.selective_scan_chunked
    with pytest.raises(RuntimeError, match="boom"), export_scan_formulation(3):
        assert isinstance(scan_mod.loop_free_formulation(), scan_mod.ExportScan)
        assert scan_mod.selective_scan_chunked is original  # selected, not patched in
        raise RuntimeError("boom")
    assert isinstance(scan_mod.loop_free_formulation(), scan_mod.ChunkedScan)
    assert scan_mod.selective_scan_chunked is original


def test_traced_student_uses_the_export_formulation_and_matches_eager():
    from lesion_kd.models import build_model

    torch.manual_seed(0)
    net = build_model("mamba_unet").eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad(), export_scan_formulation(levels_for(64 * 64), polymorphic=True):
        traced = torch.jit.trace(net, x, check_trace=False)
    with torch.no_grad():
        for shape in ((1, 3, 64, 64), (2, 3, 96, 128)):  # another batch and another size: shape-polymorphic
            y = torch.rand(shape)
            assert (traced(y) - net(y)).abs().max() < 1e-4


@pytest.mark.parametrize("fmt", ["torchscript", pytest.param("onnx", marks=pytest.mark.slow)])
def test_fixed_size_export_of_a_deep_scan_matches_eager(fmt, tmp_path):
    # 256x256: 256 tokens at stride 16, three levels of chunks (a depth that tracing must not cut short)
    from lesion_kd.deploy.export import export_network, network_metadata
    from lesion_kd.models import build_model

    torch.manual_seed(0)
    net = build_model("mamba_unet").eval()
    out = tmp_path / ("s.pt" if fmt == "torchscript" else "s.onnx")
    report = export_network(net, fmt, out, 256, network_metadata("mamba_unet", 256, net), log=lambda s: None)
    assert out.is_file() and report.max_abs_diff <= 1e-4 and len(report.checks) == 2


# --------------------------------------------------------------------------------------------------
# The inference core, with a numpy stand-in model (no export needed)
# --------------------------------------------------------------------------------------------------
class BrightnessModel(Predictor):
    """Lesion logit = brightness - 0.5; mirror-symmetric, so TTA must not change it."""

    kind = "stand-in"

    def __init__(self, size: int = 32) -> None:
        super().__init__(Path("stand-in"), size, 2, {"network": "brightness"}, "cpu")
        self.calls: list[int] = []

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.calls.append(len(batch))
        lesion = 8 * (batch.mean(1) - 0.5)
        return np.stack([np.zeros_like(lesion), lesion], axis=1)


def _mixed_folder(root: Path, kvasir: list[Path] | None = None) -> dict[str, tuple[int, int]]:
    """JPEG, gray PNG, RGBA PNG, 16-bit PNG, BMP and one corrupt file; returns {name: (h, w)} of the readable ones."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    base = (np.asarray(Image.open(kvasir[0]).convert("RGB")) if kvasir
            else rng.integers(0, 100, (90, 120, 3)).astype(np.uint8))
    base = base.copy()
    h, w = base.shape[:2]
    base[h // 4 : h // 2, w // 4 : w // 2] = 250  # a bright block: the stand-in model's lesion
    Image.fromarray(base).save(root / "photo.jpg", quality=95)
    Image.fromarray(base[:70, :50, 0]).save(root / "gray.png")
    rgba = np.dstack([base[:41, :77], np.full((41, 77), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
    Image.fromarray(base[:33, :65, 1].astype(np.uint16) * 257).save(root / "deep16.png")
    Image.fromarray(base[:50, :31]).save(root / "bitmap.bmp")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a PNG")
    (root / "README.txt").write_text("not an image: ignored")
    return {"photo.jpg": (h, w), "gray.png": (70, 50), "rgba.png": (41, 77), "deep16.png": (33, 65), "bitmap.bmp": (50, 31)}


def _rows(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "segments.csv", newline="") as f:
        return {r["id"]: r for r in csv.DictReader(f)}


def _check_outputs(out: Path, sizes: dict[str, tuple[int, int]]) -> None:
    rows = _rows(out)
    for name, (h, w) in sizes.items():
        sid = name.rsplit(".", 1)[0]
        mask = np.asarray(Image.open(out / f"{sid}_mask.png"))
        assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, 255}, name
        assert Image.open(out / f"{sid}_overlay.png").size == (w, h)
        r = rows[sid]
        assert r["status"] == "ok" and (int(r["height"]), int(r["width"])) == (h, w)
        assert int(r["lesion_pixels"]) == int((mask > 0).sum())
        assert abs(float(r["lesion_fraction"]) - (mask > 0).mean()) < 1e-5
        assert 0.5 <= float(r["image_confidence"]) <= 1.0
    bad = rows["broken"]
    assert bad["status"] == "error" and "broken.png" in bad["error"] and "corrupt or unreadable" in bad["error"]
    assert not (out / "broken_mask.png").exists()
    assert "README" not in rows


def test_segment_writes_every_readable_image_at_its_size_and_reports_the_corrupt_one(tmp_path):
    sizes = _mixed_folder(tmp_path / "in")
    lines: list[str] = []
    model = BrightnessModel()
    summary = segment_images(tmp_path / "in", tmp_path / "out", model, batch_size=2, progress=False, log=lines.append)
    assert len(summary.written) == 5 and len(summary.failed) == 1 and not summary.skipped
    _check_outputs(tmp_path / "out", sizes)
    assert any("broken.png" in line for line in lines) and "1 unreadable" in lines[0]
    assert model.calls == [2, 2, 1]  # batches of at most --batch-size
    photo = _rows(tmp_path / "out")["photo"]  # the bright block is found, with a confident lesion
    assert 0.03 < float(photo["lesion_fraction"]) < 0.2 and float(photo["lesion_confidence"]) > 0.9


def test_existing_outputs_are_skipped_unless_overwrite(tmp_path):
    _mixed_folder(tmp_path / "in")
    out = tmp_path / "out"
    segment_images(tmp_path / "in", out, BrightnessModel(), progress=False, log=lambda s: None)
    first = _rows(out)
    (out / "photo_mask.png").write_bytes(b"user's edited mask")
    lines: list[str] = []
    summary = segment_images(tmp_path / "in", out, BrightnessModel(), progress=False, log=lines.append)
    assert len(summary.skipped) == 5 and not summary.written
    assert (out / "photo_mask.png").read_bytes() == b"user's edited mask"
    assert any("skipped (outputs exist; --overwrite to redo)" in line for line in lines)
    rows = _rows(out)  # the earlier statistics are kept for the skipped images
    assert rows["photo"]["status"] == "skipped" and rows["photo"]["lesion_pixels"] == first["photo"]["lesion_pixels"]
    summary = segment_images(tmp_path / "in", out, BrightnessModel(), overwrite=True, progress=False, log=lambda s: None)
    assert len(summary.written) == 5
    assert np.asarray(Image.open(out / "photo_mask.png")).shape == tuple(map(int, (rows["photo"]["height"], rows["photo"]["width"])))


def test_tta_averages_the_unflipped_softmax_of_both_flips():
    rng = np.random.default_rng(0)
    batch = rng.random((2, 3, 16, 16)).astype(np.float32)
    weights = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)  # position-dependent: not flip-invariant

    def model(x):
        return np.stack([np.zeros(x.shape[:1] + x.shape[2:], np.float32), (x * weights[:1]).sum(1)], axis=1)

    def softmax(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    expected = (softmax(model(batch)) + softmax(model(batch[..., ::-1]))[..., ::-1]
                + softmax(model(batch[..., ::-1, :]))[..., ::-1, :]) / 3
    got = predict_probabilities(model, batch, tta=True)
    assert np.allclose(got, expected, atol=1e-6) and np.allclose(got.sum(1), 1, atol=1e-5)
    sym = BrightnessModel()  # a flip-equivariant model: TTA changes nothing
    assert np.allclose(predict_probabilities(sym, batch, tta=True), predict_probabilities(sym, batch), atol=1e-6)


def test_segment_core_imports_neither_torch_nor_lightning():
    code = ("import sys; import lesion_kd.deploy.segment, lesion_kd.commands.segment; "
            "bad = [m for m in ('torch', 'lightning', 'lesion_kd.methods', 'lesion_kd.data.datamodule') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


def test_data_package_keeps_its_public_names():
    import lesion_kd.data as data

    for name in data.__all__:
        assert getattr(data, name) is not None
    from lesion_kd.data import DataError, LesionDataModule  # noqa: F401


# --------------------------------------------------------------------------------------------------
# End to end: a trained smoke student, exported, run by onnxruntime / TorchScript
# --------------------------------------------------------------------------------------------------
def _cli(*args: str, env: dict | None = None, check: bool = True, module: str = "lesion_kd.cli") -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def exported(tmp_path_factory, data_dir) -> dict[str, Path]:
    """One smoke fit of the Mamba student (64x64), exported once to ONNX and once to TorchScript."""
    from helpers import lesion_kd, run_dir_of

    tmp = tmp_path_factory.mktemp("deploy")
    env = {"LESION_KD_DATA": str(data_dir)}
    lesion_kd("fit", "--config", "experiments/data/kvasir-seg.yaml", "--config", "experiments/method/supervised.yaml",
              "--config", "experiments/profile/smoke.yaml", "--model.network", "mamba_unet",
              "--trainer.default_root_dir", str(tmp), env_extra=env)
    ckpt = next((run_dir_of(tmp) / "checkpoints").glob("best-*.ckpt"))
    out = {"ckpt": ckpt, "dir": tmp}
    for fmt, name in (("onnx", "student.onnx"), ("torchscript", "student.pt")):
        proc = _cli("export", "--ckpt", str(ckpt), "--format", fmt, "--out", str(tmp / name), env=env)
        out[f"{fmt}_log"] = proc.stdout
        out[fmt] = tmp / name
    return out


def _kvasir_folder(data_dir: Path, n: int, folder: Path) -> Path:
    """A folder holding copies of the first ``n`` Kvasir-SEG test images."""
    folder.mkdir()
    for f in _kvasir(data_dir, n):
        Image.open(f).save(folder / f.name)
    return folder


def _kvasir(data_dir: Path, n: int) -> list[Path]:
    return sorted((data_dir / "Kvasir-SEG" / "images").glob("*.jpg"))[:n]


@pytest.mark.slow
def test_export_writes_both_formats_with_metadata_after_verifying(exported):
    import onnx

    for fmt in ("onnx", "torchscript"):
        log = exported[f"{fmt}_log"]
        assert "verify random" in log and "verify real images (4)" in log and "max |logit diff|" in log, log
        assert exported[fmt].is_file()
        assert not list(exported["dir"].glob(f".{exported[fmt].name}.tmp*"))  # the temporary file was renamed
    meta = {p.key: p.value for p in onnx.load(str(exported["onnx"])).metadata_props}
    assert meta["image_size"] == "64" and meta["network"] == "mamba_unet" and meta["num_classes"] == "2"
    assert meta["input_normalisation"] == "rgb float [0,1]" and meta["lesion_kd_version"]
    assert float(meta["verified_max_abs_diff"]) <= 1e-4 and meta["dynamic_size"] == "false"
    extra = {"lesion_kd.json": ""}
    torch.jit.load(str(exported["torchscript"]), _extra_files=extra)
    ts_meta = json.loads(extra["lesion_kd.json"])
    assert ts_meta["image_size"] == "64" and ts_meta["network"] == "mamba_unet" and ts_meta["dynamic_size"] == "false"
    assert ts_meta["input_normalisation"] == "rgb float [0,1]" and float(ts_meta["verified_max_abs_diff"]) <= 1e-4


@pytest.mark.slow
def test_exported_masks_equal_eager_pytorch_on_kvasir(exported, data_dir):
    from lesion_kd.data.io import read_image
    from lesion_kd.data.prep import resize_image
    from lesion_kd.deploy.segment import open_model
    from lesion_kd.models.loading import load_student

    net = load_student(str(exported["ckpt"]))
    x = np.stack([resize_image(read_image(f), 64) for f in _kvasir(data_dir, 6)]).astype(np.float32)
    x = np.ascontiguousarray(x.transpose(0, 3, 1, 2) / 255.0)
    with torch.no_grad():
        eager = net(torch.from_numpy(x)).numpy()
    for fmt in ("onnx", "torchscript"):
        got = open_model(exported[fmt], threads=1)(x)
        assert np.abs(got - eager).max() <= 1e-4, fmt
        a, b = got.argmax(1) > 0, eager.argmax(1) > 0
        dice = 2 * (a & b).sum() / max(1, a.sum() + b.sum()) if (a.sum() + b.sum()) else 1.0
        assert dice >= 0.999, (fmt, dice)


@pytest.mark.slow
def test_segment_from_onnx_runs_without_lightning_or_training_code(exported, data_dir, tmp_path):
    folder = _kvasir_folder(data_dir, 2, tmp_path / "in")
    code = (
        "import sys\n"
        "from lesion_kd.deploy.segment import open_model, segment_images\n"
        f"s = segment_images({str(folder)!r}, {str(tmp_path / 'out')!r}, open_model({str(exported['onnx'])!r}, threads=1), progress=False)\n"
        "assert len(s.written) == 2, s.rows\n"
        "bad = [m for m in ('lightning', 'lesion_kd.methods', 'torch') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=300)
    assert len(list((tmp_path / "out").glob("*_mask.png"))) == 2


@pytest.mark.slow
def test_segment_cli_on_a_mixed_folder_from_onnx(exported, data_dir, tmp_path):
    sizes = _mixed_folder(tmp_path / "in", _kvasir(data_dir, 1))
    proc = _cli("--model", str(exported["onnx"]), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                "--batch-size", "3", "--threads", "1", module="lesion_kd.commands.segment", check=False)
    assert proc.returncode == 1, proc.stderr  # finished, with one unreadable file
    assert "5 segmented, 0 skipped, 1 unreadable" in proc.stdout and "broken.png" in proc.stdout
    assert "segment" in proc.stderr and "img" in proc.stderr  # the tqdm progress bar
    _check_outputs(tmp_path / "out", sizes)
    again = _cli("--model", str(exported["onnx"]), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                 module="lesion_kd.commands.segment", check=False)
    assert "0 segmented, 5 skipped" in again.stdout and "--overwrite" in again.stdout


@pytest.mark.slow
def test_segment_from_torchscript_and_checkpoint_agree_with_onnx_and_tta_is_valid(exported, data_dir, tmp_path):
    from lesion_kd.deploy.segment import open_model

    folder = _kvasir_folder(data_dir, 3, tmp_path / "in")
    masks = {}
    for kind in ("onnx", "torchscript", "ckpt"):
        segment_images(folder, tmp_path / kind, open_model(exported[kind], threads=1), progress=False, log=lambda s: None)
        masks[kind] = {p.name: np.asarray(Image.open(p)) > 0 for p in sorted((tmp_path / kind).glob("*_mask.png"))}
    for kind in ("torchscript", "ckpt"):
        for name, m in masks["onnx"].items():
            o = masks[kind][name]
            total = m.sum() + o.sum()
            assert total == 0 or 2 * (m & o).sum() / total >= 0.999, (kind, name)
    segment_images(folder, tmp_path / "tta", open_model(exported["onnx"], threads=1), tta=True, progress=False,
                   log=lambda s: None)
    for f in folder.iterdir():
        mask = np.asarray(Image.open(tmp_path / "tta" / f"{f.stem}_mask.png"))
        assert mask.shape == np.asarray(Image.open(f)).shape[:2] and set(np.unique(mask)) <= {0, 255}
    rows = _rows(tmp_path / "tta")
    assert all(r["status"] == "ok" and 0.5 <= float(r["image_confidence"]) <= 1 for r in rows.values())


@pytest.mark.slow
def test_fixed_size_model_refuses_another_size(exported):
    from lesion_kd.deploy.segment import open_model

    with pytest.raises(ValueError, match=r"--size 96: .* exported for 64x64 inputs only"):
        open_model(exported["onnx"], size=96)


@pytest.mark.slow
def test_export_refuses_to_write_above_the_tolerance(exported, data_dir, tmp_path):
    out = tmp_path / "never.pt"
    proc = _cli("export", "--ckpt", str(exported["ckpt"]), "--format", "torchscript", "--out", str(out),
                "--tolerance", "1e-12", env={"LESION_KD_DATA": str(data_dir)}, check=False)
    assert proc.returncode == 1 and "refusing to write" in proc.stderr and "tolerance 1e-12" in proc.stderr
    assert not out.exists() and not list(tmp_path.iterdir())  # no temporary file left either


@pytest.mark.slow
def test_dynamic_size_exports_run_at_other_sizes(exported, data_dir, tmp_path):
    from lesion_kd.deploy.segment import open_model

    env = {"LESION_KD_DATA": str(data_dir)}
    for fmt, name in (("torchscript", "dyn.pt"), ("onnx", "dyn.onnx")):
        proc = _cli("export", "--ckpt", str(exported["ckpt"]), "--format", fmt, "--out", str(tmp_path / name),
                    "--dynamic-size", "--max-size", "512", env=env)
        assert "verify random 32x128" in proc.stdout and "verify real images at 128x128" in proc.stdout, proc.stdout
        assert "verify random 512x512" in proc.stdout and "verify random 160x224" in proc.stdout
        model = open_model(tmp_path / name, size=96, threads=1)
        assert model.image_size == 96
        assert model(np.random.default_rng(0).random((2, 3, 96, 160), np.float32)).shape == (2, 2, 96, 160)
        with pytest.raises(ValueError, match="exported for sides up to 512"):
            open_model(tmp_path / name, size=544)
