"""The teacher-embedding cache: exact round trip, resumable and atomic fills, corruption, view alignment."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lesion_kd.data.folder import Sample, scan_folder
from lesion_kd.data.geometry import coordinate_map, fit_affine, warp_to_view
from lesion_kd.data.io import read_image
from lesion_kd.models import build_teacher
from lesion_kd.models.teacher import SAMTeacher
from lesion_kd.teacher_cache import (
    CacheMiss,
    OnlineTeacherEmbeddings,
    TeacherEmbeddingCache,
    aligned,
    default_cache_dir,
    fill_teacher_cache,
)

# One windowed-attention block: about 0.4 s per image at 1024 x 1024 (most of it in SAM's 256-channel neck).
TINY_SAM = {"encoder_embed_dim": 32, "encoder_depth": 1, "encoder_num_heads": 2, "encoder_global_attn_indexes": ()}
KVASIR = Path("/work/shared/datasets/Kvasir-SEG")


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small MedSAM-architecture teacher saved as a state dict: cache tests need a fast teacher."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "medsam_tiny.pth"
    torch.save(build_teacher("medsam", pretrained=False, **TINY_SAM).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def tiny_teacher(tiny_ckpt: Path) -> torch.nn.Module:
    return build_teacher("medsam", checkpoint=tiny_ckpt, **TINY_SAM)


@pytest.fixture
def samples(tmp_path: Path) -> list[Sample]:
    """Three small synthetic images of different sizes in ``<tmp>/data/images``."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "data" / "images"
    folder.mkdir(parents=True)
    for i, (h, w) in enumerate([(48, 64), (64, 48), (40, 40)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return scan_folder(tmp_path / "data", require_masks=False)


def tiny_cache(root: Path, teacher: torch.nn.Module) -> TeacherEmbeddingCache:
    """A cache of the tiny teacher, passed built (building it for each cache object would cost a second)."""
    return TeacherEmbeddingCache(root, dataset="synthetic", teacher=teacher)


def image_tensor(path: Path) -> torch.Tensor:
    return torch.tensor(read_image(path)).permute(2, 0, 1)[None].float() / 255


def entry_bytes(cache: TeacherEmbeddingCache, samples: list[Sample]) -> list[bytes]:
    return [cache.entry_path(s).read_bytes() for s in samples]


# ------------------------------------------------------------------------------ cache behaviour
def test_cached_embedding_equals_the_freshly_computed_one(tmp_path, samples, tiny_ckpt, tiny_teacher):
    # By name and checkpoint, as the CLI does: the teacher is built inside, only to fill.
    cache = fill_teacher_cache(samples, "synthetic", "medsam", tiny_ckpt, cache_dir=tmp_path / "cache",
                               progress=False, **TINY_SAM)
    assert cache.fingerprint == tiny_teacher.fingerprint
    batch = cache.get_batch(samples)
    assert batch.dtype == torch.float16 and batch.shape == (3, 256, 64, 64)
    for s, cached in zip(samples, batch, strict=True):
        fresh = tiny_teacher.embed(image_tensor(s.image))[0]
        torch.testing.assert_close(cached.float(), fresh, atol=2e-3 * fresh.abs().max().item(), rtol=1e-3)
    assert cache.entry_path(samples[0]).stat().st_size == 64 + 256 * 64 * 64 * 2
    assert cache.dir.is_relative_to(tmp_path / "cache" / "synthetic")


def test_interrupted_fill_resumes_and_gives_the_same_cache(tmp_path, samples, tiny_teacher, monkeypatch):
    reference = tiny_cache(tmp_path / "uninterrupted", tiny_teacher)
    assert reference.fill(samples, progress=False) == 3

    embed, calls = tiny_teacher.embed, []

    def interrupted_after_two(images):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt("simulated Ctrl-C during the third image")
        return embed(images)

    monkeypatch.setattr(tiny_teacher, "embed", interrupted_after_two)
    cache = tiny_cache(tmp_path / "interrupted", tiny_teacher)
    with pytest.raises(KeyboardInterrupt):
        cache.fill(samples, progress=False)
    monkeypatch.undo()
    assert [cache.is_valid(s) for s in samples] == [True, True, False]
    assert [p.name for p in cache.dir.rglob("*") if p.is_file() and p.suffix != ".emb"] == []  # no partial file

    resumed = tiny_cache(tmp_path / "interrupted", tiny_teacher)  # as a new process would
    assert resumed.fill(samples, progress=False) == 1  # only the missing image
    assert resumed.fill(samples, progress=False) == 0
    assert entry_bytes(resumed, samples) == entry_bytes(reference, samples)


def test_a_failed_write_leaves_no_entry_and_no_temporary_file(tmp_path, samples, tiny_teacher, monkeypatch):
    cache = tiny_cache(tmp_path / "cache", tiny_teacher)

    def crash(*args):
        raise OSError("simulated crash between write and rename")

    monkeypatch.setattr("os.replace", crash)
    with pytest.raises(OSError, match="simulated"):
        cache.fill(samples[:1], progress=False)
    monkeypatch.undo()
    assert not cache.is_valid(samples[0])
    assert [p for p in cache.dir.rglob("*") if p.is_file()] == []
    assert cache.fill(samples[:1], progress=False) == 1 and cache.is_valid(samples[0])


def test_corrupt_entries_are_detected_and_recomputed(tmp_path, samples, tiny_teacher):
    cache = tiny_cache(tmp_path / "cache", tiny_teacher)
    cache.fill(samples, progress=False)
    good = entry_bytes(cache, samples)
    truncated, garbled, wrong_shape = (cache.entry_path(s) for s in samples)
    truncated.write_bytes(good[0][: len(good[0]) // 2])
    data = bytearray(good[1])
    data[1000:1008] = b"\xff" * 8
    garbled.write_bytes(bytes(data))
    data = bytearray(good[2])
    data[12:16] = (128).to_bytes(4, "little")  # the header now says 128 channels
    wrong_shape.write_bytes(bytes(data))
    assert [cache.is_valid(s) for s in samples] == [False, False, False]

    with pytest.warns(RuntimeWarning, match="checksum mismatch"):
        recomputed = cache.get(samples[1])  # read detects it and recomputes
    assert recomputed.shape == (256, 64, 64) and cache.is_valid(samples[1])
    assert cache.fill(samples, progress=False) == 2  # fill recomputes the other two
    assert entry_bytes(cache, samples) == good


def test_ddp_ranks_fill_disjoint_parts_of_one_cache(tmp_path, samples, tiny_teacher):
    cache = tiny_cache(tmp_path / "cache", tiny_teacher)
    assert cache.fill(samples, rank=1, world_size=2, progress=False) == 1
    assert [cache.is_valid(s) for s in samples] == [False, True, False]
    assert cache.fill(samples, rank=0, world_size=2, progress=False) == 2
    assert all(cache.is_valid(s) for s in samples)


def test_a_changed_image_or_teacher_misses_and_a_missing_entry_raises(tmp_path, samples, tiny_teacher):
    cache = tiny_cache(tmp_path / "cache", tiny_teacher)
    cache.fill(samples[:2], progress=False)
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(samples[0].image)  # the image changes
    with pytest.raises(CacheMiss, match="img0"):
        cache.get(samples[0])
    with pytest.raises(KeyError):  # CacheMiss is a KeyError
        cache.get_batch(samples)
    other = tmp_path / "other.pth"
    torch.manual_seed(1)
    torch.save(build_teacher("medsam", pretrained=False, **TINY_SAM).state_dict(), other)
    retrained = TeacherEmbeddingCache(tmp_path / "cache", "medsam", other, "synthetic", teacher_kwargs=TINY_SAM)
    assert retrained.dir != cache.dir and not retrained.is_valid(samples[1])


def test_cache_location_defaults_and_stays_outside_the_dataset(tmp_path, samples, tiny_teacher, monkeypatch):
    monkeypatch.setenv("LESION_KD_CACHE", str(tmp_path / "root"))
    assert default_cache_dir() == tmp_path / "root" / "teacher"
    monkeypatch.delenv("LESION_KD_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "lesion_kd" / "teacher"
    with pytest.raises(ValueError, match="inside the dataset folder"):
        tiny_cache(tmp_path / "data" / "cache", tiny_teacher).fill(samples, progress=False)


def test_online_mode_has_the_cache_api(tmp_path, samples, tiny_teacher):
    views = torch.rand(2, 3, 64, 64)
    theta = torch.eye(2, 3).expand(2, 2, 3)
    online = OnlineTeacherEmbeddings(tiny_teacher).view_embeddings(samples[:2], views, theta)
    cache = tiny_cache(tmp_path / "cache", tiny_teacher)
    cache.fill(samples[:2], progress=False)
    cached = cache.view_embeddings(samples[:2], views, theta)
    assert cached.shape == online.shape == (2, 256, 64, 64) and cached.dtype == online.dtype == torch.float32


# ---------------------------------------------------------------------------- view geometry
def compose(first: torch.Tensor, then: torch.Tensor) -> torch.Tensor:
    """theta of applying augmentation ``first`` and then ``then``: view -> intermediate -> canonical."""
    return first @ torch.cat([then, torch.tensor([[0.0, 0.0, 1.0]])])


N = 64  # the canonical map is on the embedding's 64 x 64 grid
X0, Y0, CW, CH = 10, 4, 40, 52  # a crop box in canonical pixels

# name -> (theta, the augmentation applied to a canonical (1, C, N, N) map as an image operation)
AUGMENTATIONS = {
    "identity": (torch.eye(2, 3), lambda m: m),
    "hflip": (torch.tensor([[-1.0, 0, 0], [0, 1, 0]]), lambda m: m.flip(-1)),
    "vflip": (torch.tensor([[1.0, 0, 0], [0, -1, 0]]), lambda m: m.flip(-2)),
    "rot90": (torch.tensor([[0.0, -1, 0], [1, 0, 0]]), lambda m: m.rot90(1, (-2, -1))),
    "rot270": (torch.tensor([[0.0, 1, 0], [-1, 0, 0]]), lambda m: m.rot90(3, (-2, -1))),
    "crop": (torch.tensor([[CW / N, 0, (2 * X0 + CW) / N - 1], [0, CH / N, (2 * Y0 + CH) / N - 1]]),
             lambda m: m[..., Y0 : Y0 + CH, X0 : X0 + CW]),
    # a 2x smaller view of the whole image (e.g. the 64-cell grid of a 128-pixel view): theta is identity
    "downscale": (torch.eye(2, 3), lambda m: F.avg_pool2d(m, 2)),
    # zoom out by 2: the image shrunk into the centre of a zero canvas
    "zoom_out": (torch.tensor([[2.0, 0, 0], [0, 2, 0]]), lambda m: F.pad(F.avg_pool2d(m, 2), (N // 4,) * 4)),
    "rot90_crop_hflip": (
        compose(compose(torch.tensor([[0.0, -1, 0], [1, 0, 0]]),
                        torch.tensor([[CW / N, 0, (2 * X0 + CW) / N - 1], [0, CH / N, (2 * Y0 + CH) / N - 1]])),
                torch.tensor([[-1.0, 0, 0], [0, 1, 0]])),
        lambda m: m.rot90(1, (-2, -1))[..., Y0 : Y0 + CH, X0 : X0 + CW].flip(-1),
    ),
}


@pytest.mark.parametrize("name", list(AUGMENTATIONS))
def test_aligned_coordinate_map_puts_every_cell_where_its_pixel_went(name):
    theta, augment = AUGMENTATIONS[name]
    canonical = torch.from_numpy(coordinate_map(N, N)).permute(2, 0, 1)[None]  # (1, 2, N, N), values >= 1
    where_they_went = augment(canonical)  # the augmentation itself, applied to the coordinates as an image
    size = tuple(where_they_went.shape[-2:])
    warped = warp_to_view(canonical, theta[None], size)
    torch.testing.assert_close(warped, where_they_went, atol=1e-5, rtol=0)
    # the data module records theta by fitting the augmented coordinate map: the same theta
    fitted = fit_affine(where_they_went[0].permute(1, 2, 0).numpy())
    np.testing.assert_allclose(fitted, theta.numpy(), atol=1e-4)
    # the cache's helper is the same warp, for a batch of 256-channel embeddings
    emb = canonical.repeat(2, 128, 1, 1)
    torch.testing.assert_close(aligned(emb.half(), theta.expand(2, 2, 3), size)[:, :2], warped.expand(2, 2, *size),
                               atol=2e-2, rtol=0)


# ------------------------------------------------------------------- real teacher, real image
@pytest.fixture(scope="module")
def kvasir_sample() -> Sample:
    if not (KVASIR / "images").is_dir():
        pytest.skip(f"{KVASIR} not available")
    first = (KVASIR / "splits" / "pranet_test.txt").read_text().split()[0]
    return Sample(id=first, image=KVASIR / "images" / f"{first}.jpg")


def cosine_per_cell(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over the 64 x 64 cells of the cosine similarity of the two 256-vectors."""
    return F.cosine_similarity(a.float(), b.float(), dim=1).mean().item()


TRANSFORMS = {"hflip": lambda im: im.flip(-1), "rot90": lambda im: im.rot90(1, (-2, -1))}


class _PoolEncoder(torch.nn.Module):
    """An exactly equivariant stand-in for an image encoder: (B, 3, 256, 256) -> (B, 3, 64, 64)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, 4)


def test_alignment_is_exact_through_the_letterbox_for_an_equivariant_encoder(kvasir_sample):
    """Resize, letterbox, crop and warp together lose nothing: what is left over is the teacher's own."""
    teacher = SAMTeacher(_PoolEncoder(), torch.nn.Identity(), torch.nn.Identity(), backend="pool",
                         input_size=256, letterbox=True, fingerprint="pool")
    image = image_tensor(kvasir_sample.image)
    canonical = teacher.embed(image)
    for name, transform in TRANSFORMS.items():
        view = teacher.embed(transform(image))
        torch.testing.assert_close(aligned(canonical, AUGMENTATIONS[name][0][None]), view, atol=1e-4, rtol=0)


def test_litemedsam_cache_on_a_kvasir_image_and_alignment_under_hflip_and_rot90(tmp_path, kvasir_sample):
    cache = TeacherEmbeddingCache(tmp_path / "cache", "litemedsam", dataset="kvasir-seg")
    assert cache.fill([kvasir_sample], progress=False) == 1
    cached = cache.get(kvasir_sample)[None]  # (1, 256, 64, 64), aligned with the canonical image
    image = image_tensor(kvasir_sample.image)
    assert image.shape[-2] != image.shape[-1]  # a non-square image: the letterbox is exercised
    teacher = cache.teacher
    fresh = teacher.embed(image)
    torch.testing.assert_close(cached.float(), fresh, atol=2e-3 * fresh.abs().max().item(), rtol=1e-3)

    lines = []
    for name, transform in TRANSFORMS.items():
        view_emb = teacher.embed(transform(image))
        # every dihedral candidate geometry: the recorded one must fit the fresh view embedding best
        scores = {k: cosine_per_cell(aligned(cached, AUGMENTATIONS[k][0][None]), view_emb)
                  for k in ("identity", "hflip", "vflip", "rot90", "rot270")}
        lines.append(f"{name} {scores[name]:.3f} (unaligned {scores['identity']:.3f}, "
                     f"best wrong geometry {max(v for k, v in scores.items() if k != name):.3f})")
        assert max(scores, key=scores.get) == name
        assert scores[name] > scores["identity"] + 0.05
    print(f"\nLiteMedSAM on Kvasir-SEG {kvasir_sample.id}: mean per-cell cosine(aligned cached embedding, "
          "embedding of the transformed image): " + "; ".join(lines))
