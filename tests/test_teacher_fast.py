"""The faster cache encoders (issue 29): same embeddings within tolerance, own cache key, old path kept."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lesion_kd.commands import cache_teacher
from lesion_kd.data.folder import Sample
from lesion_kd.models import build_teacher
from lesion_kd.models.teacher_fast import ENCODERS, encoder_fingerprint
from lesion_kd.teacher_cache import ENCODER_ENV, TeacherEmbeddingCache, _image_tensor, fill_teacher_cache

KVASIR = Path("/work/shared/datasets/Kvasir-SEG")
# The tolerance the faster encoders are held to: per cell (each of the 64 x 64 positions, across the 256
# channels) cosine to the torch encoder's embedding, on real images.
MIN_COSINE = {"onnx": 0.99999, "hybrid": 0.999}
TINY_SAM = {"encoder_embed_dim": 32, "encoder_depth": 1, "encoder_num_heads": 2, "encoder_global_attn_indexes": ()}

needs_kvasir = pytest.mark.skipif(not (KVASIR / "splits" / "pranet_train.txt").is_file(),
                                  reason="Kvasir-SEG not under /work/shared/datasets")


@pytest.fixture(scope="module")
def kvasir_samples() -> list[Sample]:
    """Three real training images (different sizes and aspect ratios: the letterbox crop is exercised)."""
    ids = (KVASIR / "splits" / "pranet_train.txt").read_text().split()[:3]
    return [Sample(id=i, image=KVASIR / "images" / f"{i}.jpg") for i in ids]


@pytest.fixture(scope="module")
def litemedsam() -> torch.nn.Module:
    return build_teacher("litemedsam")


@pytest.fixture(scope="module")
def torch_entries(tmp_path_factory, litemedsam, kvasir_samples) -> tuple[Path, torch.Tensor]:
    root = tmp_path_factory.mktemp("cache")
    cache = TeacherEmbeddingCache(root, dataset="kvasir-seg", teacher=litemedsam, encoder="torch")
    assert cache.fill(kvasir_samples, progress=False) == 3
    return root, cache.get_batch(kvasir_samples).float()


@needs_kvasir
@pytest.mark.parametrize("encoder", ["hybrid", "onnx"])
def test_fast_encoder_matches_torch_per_cell_on_real_images(encoder, torch_entries, litemedsam, kvasir_samples):
    root, reference = torch_entries
    cache = TeacherEmbeddingCache(root, dataset="kvasir-seg", teacher=litemedsam, encoder=encoder)
    assert cache.fill(kvasir_samples, progress=False) == 3  # its own entries: none of torch's is reused
    fast = cache.get_batch(kvasir_samples).float()
    cos = F.cosine_similarity(fast, reference, dim=1)  # (3, 64, 64): one value per cell
    print(f"\n{encoder} vs torch on {len(kvasir_samples)} Kvasir-SEG images: per-cell cosine min "
          f"{cos.min().item():.6f}, mean {cos.mean().item():.6f}; max |diff| {(fast - reference).abs().max().item():.4f}")
    assert cos.min().item() >= MIN_COSINE[encoder]
    # The same through the teacher directly (no cache, float32), for the first image.
    x = _image_tensor(kvasir_samples[0].image)
    direct = litemedsam.embed(x, image_encoder=cache.image_encoder)
    assert F.cosine_similarity(direct, litemedsam.embed(x), dim=1).min().item() >= MIN_COSINE[encoder]


@needs_kvasir
def test_encoders_key_their_entries_apart_and_torch_stays_the_default(tmp_path, torch_entries, litemedsam,
                                                                      kvasir_samples, monkeypatch):
    root, reference = torch_entries
    monkeypatch.delenv(ENCODER_ENV, raising=False)
    default = TeacherEmbeddingCache(root, dataset="kvasir-seg", teacher=litemedsam)
    assert default.encoder == "torch" and default.fingerprint == litemedsam.fingerprint  # today's entries
    torch.testing.assert_close(default.get_batch(kvasir_samples).float(), reference, rtol=0, atol=0)
    prints = {e: TeacherEmbeddingCache(root, dataset="kvasir-seg", teacher=litemedsam, encoder=e).fingerprint
              for e in ENCODERS}
    assert len(set(prints.values())) == len(ENCODERS)
    assert prints["hybrid"] == encoder_fingerprint(litemedsam.fingerprint, "hybrid") == litemedsam.fingerprint + "-ehybrid1"
    dirs = {TeacherEmbeddingCache(root, dataset="kvasir-seg", teacher=litemedsam, encoder=e).dir for e in ENCODERS}
    assert len(dirs) == len(ENCODERS)
    # An empty hybrid cache does not see the torch entries (and vice versa): a miss, not a mixed read.
    fresh = TeacherEmbeddingCache(tmp_path, dataset="kvasir-seg", teacher=litemedsam, encoder="hybrid")
    assert not fresh.is_valid(kvasir_samples[0])
    # Opt-in by environment, for training runs that should read the hybrid entries.
    monkeypatch.setenv(ENCODER_ENV, "hybrid")
    assert TeacherEmbeddingCache(root, dataset="kvasir-seg", teacher=litemedsam).fingerprint == prints["hybrid"]
    monkeypatch.setenv(ENCODER_ENV, "fp8")
    with pytest.raises(ValueError, match="unknown teacher encoder"):
        TeacherEmbeddingCache(root, dataset="kvasir-seg", teacher=litemedsam)


def test_old_torch_path_stays_selectable_and_onnx_runs_any_teacher(tmp_path, monkeypatch):
    """By name, as the CLI does, with a tiny MedSAM: torch entries are the teacher's own embed, bit for bit;
    onnx entries land in a separate folder and agree; hybrid refuses a non-TinyViT teacher."""
    from PIL import Image

    torch.manual_seed(0)
    ckpt = tmp_path / "tiny.pth"
    torch.save(build_teacher("medsam", pretrained=False, **TINY_SAM).state_dict(), ckpt)
    folder = tmp_path / "data" / "images"
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    samples = []
    for i, (h, w) in enumerate([(48, 64), (40, 40)]):
        arr = (torch.rand(h, w, 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(folder / f"img{i}.png")
        samples.append(Sample(id=f"img{i}", image=folder / f"img{i}.png"))
    monkeypatch.delenv(ENCODER_ENV, raising=False)
    old = fill_teacher_cache(samples, "synthetic", "medsam", ckpt, tmp_path / "cache", progress=False,
                             encoder="torch", **TINY_SAM)
    teacher = build_teacher("medsam", checkpoint=ckpt, **TINY_SAM)
    assert old.fingerprint == teacher.fingerprint
    for s, cached in zip(samples, old.get_batch(samples), strict=True):
        fresh = teacher.embed(_image_tensor(s.image))[0].half()
        assert torch.equal(cached, fresh)  # the old path: exactly what embed gives, as before
    new = fill_teacher_cache(samples, "synthetic", "medsam", ckpt, tmp_path / "cache", progress=False,
                             encoder="onnx", **TINY_SAM)
    assert new.dir != old.dir and new.fingerprint.endswith("-eonnx1")
    cos = F.cosine_similarity(new.get_batch(samples).float(), old.get_batch(samples).float(), dim=1)
    assert cos.min().item() >= MIN_COSINE["onnx"]
    hybrid = TeacherEmbeddingCache(tmp_path / "cache", "medsam", ckpt, "synthetic", teacher_kwargs=TINY_SAM,
                                   encoder="hybrid")
    with pytest.raises(ValueError, match="litemedsam"):
        hybrid.fill(samples, progress=False)


def test_cache_teacher_command_takes_the_encoder(monkeypatch):
    """``lesion-kd cache-teacher --encoder hybrid`` passes it on; without the flag the default (torch) applies."""
    seen = {}

    def fake_fill(samples, dataset, teacher, checkpoint, cache_dir, rank, world_size, encoder=None):
        seen["encoder"] = encoder
        return TeacherEmbeddingCache.__new__(TeacherEmbeddingCache)

    class FakeDM:
        dataset_name = "synthetic"
        splits = {"train": []}

        def __init__(self, **kwargs):
            pass

        def setup(self):
            pass

    import lesion_kd.data
    import lesion_kd.teacher_cache

    monkeypatch.setattr(lesion_kd.teacher_cache, "fill_teacher_cache", fake_fill)
    monkeypatch.setattr(lesion_kd.data, "LesionDataModule", FakeDM)
    monkeypatch.setattr(TeacherEmbeddingCache, "dir", "x", raising=False)
    assert cache_teacher.main(["--encoder", "hybrid"]) == 0 and seen["encoder"] == "hybrid"
    assert cache_teacher.main([]) == 0 and seen["encoder"] is None
    with pytest.raises(SystemExit):
        cache_teacher.main(["--encoder", "fp8"])
