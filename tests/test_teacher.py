"""The frozen teachers: LiteMedSAM's bundled weights are real, MedSAM loads through the same strict code."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import TINY_SAM, dice, disk_scene

from lesion_kd.models import build_teacher, list_teachers
from lesion_kd.models.teacher import SAMTeacher, TeacherCheckpointError, litemedsam_checkpoint_path


@pytest.fixture(scope="module")
def litemedsam(tmp_path_factory: pytest.TempPathFactory) -> SAMTeacher:
    # Build from an empty working directory: the package's own model(pretrained=True) would copy the
    # checkpoint into ./temp/, ours must not write anything.
    cwd, empty = os.getcwd(), tmp_path_factory.mktemp("cwd")
    os.chdir(empty)
    try:
        teacher = build_teacher("litemedsam")
    finally:
        os.chdir(cwd)
    assert list(empty.iterdir()) == []
    return teacher


def test_both_teachers_are_registered():
    assert {"litemedsam", "medsam"} <= set(list_teachers())


def test_litemedsam_is_the_bundled_checkpoint_loaded_strictly_and_frozen(litemedsam):
    state = torch.load(litemedsam_checkpoint_path(), map_location="cpu", weights_only=True)
    own = litemedsam.state_dict()
    assert set(state) == set(own)
    assert all(torch.equal(state[k], own[k]) for k in own)
    assert not litemedsam.training and not any(p.requires_grad for p in litemedsam.parameters())
    litemedsam.train()  # a parent LightningModule switching to training must not unfreeze BatchNorm
    assert not litemedsam.training and not litemedsam.image_encoder.training


def test_trained_litemedsam_segments_a_disk_from_its_box_and_random_weights_do_not(litemedsam):
    image, disk, box = disk_scene()
    trained = dice(litemedsam.predict_mask(image, box)[0, 0], disk)
    torch.manual_seed(0)
    random_teacher = build_teacher("litemedsam", pretrained=False)
    untrained = dice(random_teacher.predict_mask(image, box)[0, 0], disk)
    print(f"\nLiteMedSAM box-prompted Dice on a synthetic disk: trained {trained:.3f}, random init {untrained:.3f}")
    assert trained > 0.9
    assert untrained < 0.9
    assert random_teacher.fingerprint != litemedsam.fingerprint


class _PoolEncoder(nn.Module):
    """Stands in for an image encoder: (B, 3, 256, 256) -> (B, 3, 64, 64) by 4x4 averaging."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, 4)


def test_letterbox_padding_is_removed_so_the_embedding_covers_the_whole_image():
    teacher = SAMTeacher(_PoolEncoder(), nn.Identity(), nn.Identity(), backend="fake", input_size=256,
                         letterbox=True, fingerprint="fake")
    teacher.register_buffer("anchor", torch.zeros(1))  # embed() follows the module's device
    h, w = 150, 300  # letterboxed to 128 x 256: the bottom half of the model input is padding
    ramp_y = torch.linspace(0, 1, h).view(1, 1, h, 1).expand(1, 3, h, w)
    ramp_x = torch.linspace(0, 1, w).view(1, 1, 1, w).expand(1, 3, h, w)
    for ramp in (ramp_y, ramp_x):
        emb = teacher.embed(ramp.contiguous())
        expected = F.interpolate(ramp, (64, 64), mode="bilinear", align_corners=False, antialias=True)
        assert emb.shape == (1, 3, 64, 64)
        torch.testing.assert_close(emb, expected, atol=0.02, rtol=0)


@pytest.fixture(scope="module")
def tiny_medsam_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    net = build_teacher("medsam", pretrained=False, **TINY_SAM)
    path = tmp_path_factory.mktemp("ckpt") / "medsam_tiny.pth"
    # A SAM state dict, as medsam_vit_b.pth is one (image_encoder.*, prompt_encoder.*, mask_decoder.*).
    torch.save(net.state_dict(), path)
    return path


def test_medsam_builds_from_a_saved_checkpoint_and_runs(tiny_medsam_checkpoint):
    teacher = build_teacher("medsam", checkpoint=tiny_medsam_checkpoint, **TINY_SAM)
    saved = torch.load(tiny_medsam_checkpoint, weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in teacher.state_dict().items())
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert teacher.input_size == 1024 and teacher.fingerprint.startswith("medsam-")
    images = torch.rand(2, 3, 90, 130)
    emb = teacher.embed(images)
    assert emb.shape == (2, 256, 64, 64) and torch.isfinite(emb).all()
    # MedSAM min-max scales each image, so a brightness/contrast change of the input changes nothing.
    torch.testing.assert_close(teacher.embed(0.5 * images + 0.2), emb, atol=1e-4, rtol=1e-4)
    prob = teacher.predict_mask(images, torch.tensor([[10.0, 10.0, 80.0, 60.0], [0.0, 0.0, 129.0, 89.0]]))
    assert prob.shape == (2, 1, 90, 130) and prob.min() >= 0 and prob.max() <= 1


def test_mismatched_or_missing_checkpoints_give_errors_naming_the_file(tiny_medsam_checkpoint, tmp_path):
    path = str(tiny_medsam_checkpoint)
    with pytest.raises(TeacherCheckpointError, match=r"14 missing key\(s\) \[image_encoder\.blocks\.2\.") as e:
        build_teacher("medsam", checkpoint=path, **{**TINY_SAM, "encoder_depth": 3})
    assert path in str(e.value) and "depth=3" in str(e.value)
    with pytest.raises(TeacherCheckpointError, match=r"unexpected key\(s\) \[image_encoder\.blocks\.1\.") as e:
        build_teacher("medsam", checkpoint=path, **{**TINY_SAM, "encoder_depth": 1})
    assert path in str(e.value)
    with pytest.raises(TeacherCheckpointError, match="shape mismatch") as e:
        build_teacher("medsam", checkpoint=path, **{**TINY_SAM, "encoder_embed_dim": 48})
    assert path in str(e.value) and "image_encoder.patch_embed.proj.weight" in str(e.value)
    with pytest.raises(TeacherCheckpointError, match="not found") as e:
        build_teacher("medsam", checkpoint=tmp_path / "medsam_vit_b.pth")
    assert "medsam_vit_b.pth" in str(e.value) and "SAM ViT-B" in str(e.value)
    with pytest.raises(TeacherCheckpointError, match="needs checkpoint"):
        build_teacher("medsam")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(TeacherCheckpointError, match="not readable") as e:
        build_teacher("medsam", checkpoint=garbage, **TINY_SAM)
    assert str(garbage) in str(e.value)
    # The wrong model's weights for LiteMedSAM: the message says what LiteMedSAM expects.
    with pytest.raises(TeacherCheckpointError, match="LiteMedSAM state dict") as e:
        build_teacher("litemedsam", checkpoint=path)
    assert path in str(e.value) and "missing key" in str(e.value)
