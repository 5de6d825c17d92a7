"""SemiKD+'s L_pl (issue 28): the teacher's pseudo-labels, confidence-weighted; the read-out head's labels of a
view follow the view's recorded geometry exactly; the paper's method is untouched when L_pl is off."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import view_geometries

from lesion_kd.data.geometry import warp_to_view
from lesion_kd.losses import confidence_weights, pseudo_label_loss
from lesion_kd.methods import SemiKDModule
from lesion_kd.teacher_cache import aligned


def probs_of(lesion: torch.Tensor) -> torch.Tensor:
    """(B, 2, H, W) class probabilities from a (B, H, W) lesion probability."""
    return torch.stack([1 - lesion, lesion], 1)


def test_confident_agreement_costs_little_and_disagreement_much():
    torch.manual_seed(0)
    q = (torch.rand(2, 16, 16) > 0.5).float() * 0.98 + 0.01  # a sure teacher
    agree = torch.log(probs_of(q)) * 5
    assert pseudo_label_loss(agree, probs_of(q)).item() < 0.05
    assert pseudo_label_loss(-agree, probs_of(q)).item() > 0.9


def test_pixels_the_teacher_hesitates_on_do_not_count():
    torch.manual_seed(0)
    q = torch.full((1, 8, 8), 0.5)
    q[:, :4] = 0.99  # sure lesion on the top half, undecided below
    w = confidence_weights(q)
    assert torch.all(w[:, 4:] == 0) and torch.allclose(w[:, :4], torch.tensor(0.98))
    a = torch.randn(1, 2, 8, 8)
    b = a.clone()
    b[..., 4:, :] = torch.randn(1, 2, 4, 8) * 10  # anything at all where the teacher hesitates
    assert torch.allclose(pseudo_label_loss(a, probs_of(q)), pseudo_label_loss(b, probs_of(q)))


def test_the_gradient_pulls_the_student_to_the_teacher_label_and_never_into_the_teacher():
    q = torch.tensor([[[0.95, 0.05]]])  # (1, 1, 2): lesion, background
    logits = torch.zeros(1, 2, 1, 2, requires_grad=True)
    teacher = probs_of(q).requires_grad_(True)
    pseudo_label_loss(logits, teacher).backward()
    g = logits.grad[0, :, 0]  # (2 classes, 2 pixels)
    assert g[1, 0] < 0 < g[0, 0]  # pixel 0: raise the lesion logit
    assert g[0, 1] < 0 < g[1, 1]  # pixel 1: raise the background logit
    assert teacher.grad is None  # the target is detached


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="two \\(B, 2, H, W\\) tensors"):
        pseudo_label_loss(torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 4, 4))


# name -> (theta, the augmentation on a canonical (B, C, 64, 64) map); the crop keeps rows 4:56, columns 10:50
GEOMETRIES = view_geometries(64, crop=(10, 4, 40, 52))


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_a_views_pseudo_label_is_the_canonical_one_moved_by_the_views_geometry(name):
    """The head labels the embedding brought onto the view (the cache's warp): for a linear read-out that equals
    the canonical image's label moved by the same geometry, cell for cell."""
    theta, augment = GEOMETRIES[name]
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    disk = (((yy - 20) ** 2 + (xx - 37) ** 2) <= 12**2).float()  # off-centre, so every geometry moves it
    emb = torch.randn(1, 256, 64, 64) * 0.01
    emb[:, 5] = disk * 2 - 1
    module = SemiKDModule(network="mamba_unet", lambda_pl=1.0, pl_head_hidden=0)
    with torch.no_grad():
        module.pl_head.out.weight.zero_()
        module.pl_head.out.bias.zero_()
        module.pl_head.out.weight[1, 5] = 4.0  # the lesion logit reads channel 5
        part = {"teacher_emb": emb.half(), "theta": theta[None]}
        # training reads the view's embedding on the 64 x 64 grid through the cache's warp (aligned); here on
        # the view's own cell grid, where a crop's cells are the canonical cells it keeps
        torch.testing.assert_close(module._teacher_embeddings(torch.zeros(1, 3, 64, 64), part),
                                   aligned(part["teacher_emb"], part["theta"], (64, 64)))
        size = tuple(augment(emb).shape[-2:])
        view_label = module.pl_head(aligned(part["teacher_emb"], part["theta"], size)).argmax(1)
        canonical_label = module.pl_head(emb.half().float()).argmax(1)
    expected = augment(canonical_label[:, None].float())[:, 0].long()
    assert view_label.shape == expected.shape and torch.equal(view_label, expected)
    # and the warp itself is the data module's (geometry.warp_to_view), the one the cache's tests pin
    torch.testing.assert_close(warp_to_view(disk[None, None], theta[None], size), augment(disk[None, None]), atol=1e-5,
                               rtol=0)


def test_results_names_and_the_paper_method_untouched():
    torch.manual_seed(0)
    plain = SemiKDModule(network="mamba_unet")
    assert plain.results_name == "semikd" and plain.pl_head is None
    assert not any(k.startswith("pl_head") for k in plain.state_dict())
    torch.manual_seed(0)
    again = SemiKDModule(network="mamba_unet", lambda_pl=0.0)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in plain.state_dict().items())  # same init draws
    assert SemiKDModule(network="mamba_unet", lambda_pl=1.0).results_name == "semikd_plus"
    assert SemiKDModule(network="mamba_unet", lambda_pl=1.0, kd_mode="none", use_dss=False).results_name == "semikd_pl"
    with pytest.raises(ValueError, match="model.lambda_pl=-1"):
        SemiKDModule(network="mamba_unet", lambda_pl=-1.0)


def test_l_pl_trains_the_student_only_through_its_logits():
    """One training step's L_pl moves the student, the head's own loss moves the head only."""
    module = SemiKDModule(network="mamba_unet", lambda_pl=1.0, kd_mode="none", use_dss=False)
    emb = torch.randn(2, 256, 64, 64).half()
    part = {"teacher_emb": emb, "theta": torch.eye(2, 3).expand(2, 2, 3), "image_weak": torch.rand(2, 3, 64, 64),
            "mask": torch.zeros(2, 64, 64, dtype=torch.long)}
    logits = module.net(torch.cat([part["image_weak"], part["image_weak"]]))
    losses: dict = {}
    total = module._pseudo_label_terms(part, dict(part), logits, 2, 1.0, losses)
    assert set(losses) == {"pl_head", "pl"}
    head_grads = torch.autograd.grad(losses["pl"], list(module.pl_head.parameters()), allow_unused=True)
    assert all(g is None for g in head_grads)  # the pseudo-labels are a target, not a path into the head
    student_grads = torch.autograd.grad(losses["pl_head"], list(module.net.parameters()), allow_unused=True)
    assert all(g is None for g in student_grads)  # the head's loss reads the frozen teacher only
    assert torch.isfinite(total)
    assert module.pl_head.training  # put back in training mode after labelling in eval mode
    assert F.softmax(logits, 1).shape == (4, 2, 64, 64)


@pytest.mark.slow
def test_smoke_fit_of_semikd_plus_lands_as_its_own_row(tmp_path, data_dir):
    import json

    from helpers import lesion_kd

    lesion_kd("fit", "--config", "experiments/data/kvasir-seg.yaml", "--config", "experiments/method/semikd_plus.yaml",
              "--config", "experiments/profile/smoke.yaml", "--trainer.default_root_dir", str(tmp_path / "runs"),
              "--results_root", str(tmp_path / "results"), env_extra={"LESION_KD_DATA": str(data_dir)}, timeout=900)
    cell = tmp_path / "results" / "kvasir-seg" / "semikd_plus-mamba_unet-10pct-seed0"
    assert json.loads((cell / "metrics.json").read_text())["n_images"] == 8
    header = (cell / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/pl", "train/pl_head", "train/kd_map", "train/dss"} <= set(header)  # every term ran
