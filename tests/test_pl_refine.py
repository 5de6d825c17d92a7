"""SemiKD+'s box-refined pseudo-labels (issue 28): the box of the read-out's label, moved into the image's own
pixels, prompts the teacher's decoder; the refined canonical labels follow each view's geometry exactly; they
are refreshed on schedule and saved in checkpoints, so that a resumed run continues with the same labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import view_geometries

from lesion_kd.data.folder import Sample
from lesion_kd.methods import SemiKDModule
from lesion_kd.pseudo_labels import canonical_box_to_input, largest_box, refine_with_boxes


def test_largest_box_is_the_biggest_component_and_none_when_empty():
    m = np.zeros((20, 30), np.uint8)
    m[2:4, 3:5] = 1  # small
    m[10:17, 12:25] = 1  # large
    assert largest_box(m) == (12, 10, 25, 17)
    assert largest_box(np.zeros((5, 5), np.uint8)) is None


def test_a_canonical_box_lands_on_the_images_own_pixels():
    # canonical 16 x 16 grid of a 32 (high) x 64 (wide) image: x scales by 4, y by 2
    torch.testing.assert_close(canonical_box_to_input((2, 4, 6, 8), 16, (32, 64)),
                               torch.tensor([[8.0, 8.0, 24.0, 16.0]]))


class BoxTeacher:
    """Stands in for SAMTeacher.decode_boxes: the 'decoder' fills the prompted box (in input pixels) and records
    what it was given."""

    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, tuple]] = []

    def decode_boxes(self, frame, boxes, size=None):
        _, _, (H, W) = frame
        self.calls.append((boxes.clone(), size))
        ys = (torch.arange(size[0]) + 0.5) * H / size[0]
        xs = (torch.arange(size[1]) + 0.5) * W / size[1]
        x0, y0, x1, y1 = boxes[0].tolist()
        inside = ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]
        return inside.float()[None, None]


def test_refinement_prompts_with_the_labels_box_and_keeps_an_empty_label():
    probs = torch.zeros(2, 16, 16)
    probs[0, 5:9, 3:11] = 0.8  # a lesion; image 1 has none
    probs[0, 6, 6] = 0.3  # a hole the box fills
    teacher = BoxTeacher()
    frames = [(torch.zeros(1, 256, 64, 64), (128, 256), (32, 64))] * 2
    out, refined = refine_with_boxes(teacher, frames, probs)
    assert refined.tolist() == [True, False]
    assert len(teacher.calls) == 1  # no prompt for an image without a lesion
    box, size = teacher.calls[0]
    torch.testing.assert_close(box, torch.tensor([[3 * 4.0, 5 * 2.0, 11 * 4.0, 9 * 2.0]]))
    assert size == (16, 16)
    expected = torch.zeros(16, 16)
    expected[5:9, 3:11] = 1
    assert torch.equal(out[0], expected)  # the decoder's mask, back on the canonical grid
    assert torch.equal(out[1], probs[1])  # the read-out's own (empty) label kept


# name -> (theta, the augmentation on a canonical (B, C, 32, 32) map); the crop keeps rows 2:26, columns 4:28
GEOMETRIES = view_geometries(32, crop=(4, 2, 24, 24))


def refine_module(**kw) -> SemiKDModule:
    return SemiKDModule(network="mamba_unet", lambda_pl=1.0, kd_mode="none", use_dss=False, pl_refine="box", **kw)


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_a_views_refined_label_is_the_canonical_one_moved_by_the_views_geometry(name, monkeypatch):
    theta, augment = GEOMETRIES[name]
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    disk = (((yy - 9) ** 2 + (xx - 19) ** 2) <= 6**2).float()  # off-centre, so every geometry moves it
    other = torch.zeros(32, 32)
    other[20:30, 2:8] = 1
    module = refine_module()
    module.__dict__["_pl_refined"] = (torch.stack([other, disk]) * 255).to(torch.uint8)
    size = tuple(augment(disk[None, None]).shape[-2:])
    lab = {"teacher_emb": torch.zeros(1, 256, 64, 64).half(), "theta": torch.eye(2, 3)[None],
           "image_weak": torch.rand(1, 3, *size), "mask": torch.zeros(1, *size, dtype=torch.long)}
    unl = {"index": torch.tensor([1]), "theta": theta[None], "image_weak": torch.rand(1, 3, *size)}
    logits = torch.zeros(2, 2, *size)  # student: undecided everywhere
    seen = {}

    def capture(student_logits, teacher_probs):
        seen["q"] = teacher_probs
        return student_logits.sum() * 0

    monkeypatch.setattr("lesion_kd.losses.pseudo_label_loss", capture)
    module._pseudo_label_terms(lab, unl, logits, 1, 1.0, {})
    expected = augment(disk[None, None])[:, 0]
    assert seen["q"].shape == (1, 2, *size)
    torch.testing.assert_close(seen["q"][:, 1], expected, atol=1e-5, rtol=0)  # image 1's label, not image 0's
    torch.testing.assert_close(seen["q"].sum(1), torch.ones(1, *size))


class FakeEmbeddings:
    def __init__(self, table: dict[str, torch.Tensor]) -> None:
        self.table = table

    def get_batch(self, samples):
        return torch.stack([self.table[s.id] for s in samples]).half()


class FakeFrames:
    def __init__(self) -> None:
        self.teacher = BoxTeacher()

    def prompt_frame(self, sample, image_hw):
        return torch.zeros(1, 256, 64, 64), (64, 64), tuple(image_hw)


def test_refresh_labels_every_unlabeled_image_and_survives_a_checkpoint(tmp_path):
    import cv2

    samples, table = [], {}
    for i in range(3):
        path = tmp_path / f"img{i}.png"
        cv2.imwrite(str(path), np.zeros((40, 40, 3), np.uint8))
        samples.append(Sample(id=f"img{i}", image=path, mask=None))
        emb = torch.zeros(256, 64, 64)
        emb[7, 8 * i : 8 * i + 20, 10:40] = 1.0  # a lesion the head reads off channel 7, in a different place each
        table[f"img{i}"] = emb
    module = refine_module(pl_head_hidden=0)
    with torch.no_grad():
        module.pl_head.out.weight.zero_()
        module.pl_head.out.bias.copy_(torch.tensor([0.0, -4.0]))
        module.pl_head.out.weight[1, 7] = 8.0
    module.__dict__["_pl_refine_sources"] = (FakeEmbeddings(table), FakeFrames(), samples, 32)
    module.refresh_refined_labels(chunk=2)
    labels = module.__dict__["_pl_refined"]
    assert labels.shape == (3, 32, 32) and labels.dtype == torch.uint8
    for i in range(3):  # the decoder filled the box of each head label: rows 4i..4i+10, columns 5..20 of 32
        ys, xs = np.nonzero(labels[i].numpy() >= 128)
        assert (ys.min(), ys.max()) == (4 * i, 4 * i + 9) and (xs.min(), xs.max()) == (5, 19)
    assert module.pl_head.training  # back to training mode
    ckpt: dict = {}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "c.pt")
    again = refine_module(pl_head_hidden=0)
    again.on_load_checkpoint(torch.load(tmp_path / "c.pt"))
    assert torch.equal(again.__dict__["_pl_refined"], labels)
    assert again.__dict__["_pl_refined_step"] == module.__dict__["_pl_refined_step"]


def test_refine_options_are_checked():
    with pytest.raises(ValueError, match="model.pl_refine='box'.*lambda_pl"):
        SemiKDModule(network="mamba_unet", pl_refine="box")
    with pytest.raises(ValueError, match="teacher_mode"):
        SemiKDModule(network="mamba_unet", lambda_pl=1.0, pl_refine="box", teacher_mode="online")
    with pytest.raises(ValueError, match="model.pl_refine_start=1.5"):
        refine_module(pl_refine_start=1.5)
    with pytest.raises(ValueError, match="model.pl_refine_every=0"):
        refine_module(pl_refine_every=0)


@pytest.mark.slow
def test_smoke_fit_with_box_refined_labels(tmp_path, data_dir):
    """A real fit: the frame cache is filled for the unlabeled images, the labels are refined by LiteMedSAM's
    decoder at step round(0.3 x 3) = 1 and every step after it (pl_refine_every 1), and the last checkpoint
    holds them."""
    from helpers import lesion_kd

    lesion_kd("fit", "--config", "experiments/data/kvasir-seg.yaml", "--config", "experiments/method/semikd_plus.yaml",
              "--config", "experiments/profile/smoke.yaml", "--model.init_args.pl_refine", "box",
              "--model.init_args.pl_refine_every", "1", "--trainer.default_root_dir", str(tmp_path / "runs"),
              "--results_root", str(tmp_path / "results"), env_extra={"LESION_KD_DATA": str(data_dir)}, timeout=900)
    cell = tmp_path / "results" / "kvasir-seg" / "semikd_plus-mamba_unet-10pct-seed0"
    rows = (cell / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert {"train/pl", "train/pl_refined_share", "train/pl_refine_seconds"} <= set(header)
    last = next((tmp_path / "runs").rglob("last.ckpt"))
    kept = torch.load(last, map_location="cpu", weights_only=False)["semikd_pl_refined"]
    assert kept["step"] == 2 and kept["labels"].dtype == torch.uint8
    assert kept["labels"].shape == (14, 64, 64)  # 16 training images, 2 labeled at 10%, at the smoke grid
