"""The methods with a SAM inside (SemiSAM-MT, CPC-SAM; CPU, a few seconds each with the real LiteMedSAM):
SemiSAM-MT's box prompt from the student's prediction and the pseudo-label the real LiteMedSAM makes from it;
CPC-SAM's cross point prompts between its two decoders and its LoRA (identity at start, only LoRA + decoders
trainable, no gradient into the frozen encoder). The method tests are organised by family: see
tests/test_methods_common.py."""

from __future__ import annotations

import inspect

import pytest
import torch
from helpers import TINY, TINY_SAM, batch, dice, disk_scene, method_config

from lesion_kd.methods import CPCSAM, SemiSAMMT
from lesion_kd.methods.cpc_sam import point_prompts, to_model_frame
from lesion_kd.methods.semisam_mt import box_from_prediction
from lesion_kd.models import build_teacher
from lesion_kd.models.sam_lora import LoRAQKV, SAMDualDecoder, add_lora

# training_step outside a Trainer: self.log() only warns
pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")


@pytest.fixture(scope="module")
def cpc() -> CPCSAM:
    torch.manual_seed(0)
    return CPCSAM(**method_config("cpc_sam")["init_args"])


def test_configs_name_the_classes_and_match_their_defaults():
    for name, cls in (("semisam_mt", SemiSAMMT), ("cpc_sam", CPCSAM)):
        cfg = method_config(name)
        assert cfg["class_path"] == f"lesion_kd.methods.{cls.__name__}" and cls.method_name == name
        assert cls.uses_unlabeled
        params = inspect.signature(cls.__init__).parameters
        for key, value in cfg["init_args"].items():
            if key in params and key != "network_kwargs":
                default = params[key].default
                assert value == (pytest.approx(default) if isinstance(default, float) else default), key


# --------------------------------------------------------------------------------------- SemiSAM-MT
def test_box_prompt_is_the_largest_components_box_with_a_bounded_outward_jitter():
    pred = torch.zeros(3, 64, 64, dtype=torch.long)
    pred[0, 10:30, 20:41] = 1  # the largest component: x 20..40, y 10..29
    pred[0, 50:53, 50:53] = 1  # a small spurious blob, ignored
    pred[1, 0:5, 60:64] = 1  # at the border: the jitter is clipped to the image
    exact, keep = box_from_prediction(pred, shift=0.0)
    assert keep.tolist() == [True, True, False]  # nothing predicted in image 2: no prompt
    assert exact[0].tolist() == [20, 10, 40, 29] and exact[1].tolist() == [60, 0, 63, 4]
    assert exact[2].tolist() == [0, 0, 0, 0]
    g = torch.Generator().manual_seed(0)
    boxes = torch.stack([box_from_prediction(pred, shift=5 / 64, generator=g)[0][0] for _ in range(200)])
    grow = (boxes - exact[0]) * torch.tensor([-1, -1, 1, 1])  # outward movement of each side
    assert grow.min() == 0 and grow.max() == 5  # 0..5 px, every value reached
    assert set(grow.flatten().tolist()) == {0, 1, 2, 3, 4, 5}
    clipped = torch.stack([box_from_prediction(pred, shift=5 / 64, generator=g)[0][1] for _ in range(50)])
    assert clipped[:, 1].min() == 0 and clipped[:, 2].max() == 63


def test_the_box_of_the_students_prediction_makes_litemedsam_cover_the_disk():
    image, disk, _ = disk_scene(96, 128)
    m = SemiSAMMT(**TINY)
    pred = disk.long()[None].clone()
    pred[0, :6, :6] = 1  # a spurious blob: the box is the disk's, not the union's
    pred[0, 40:50, 55:65] = 0  # a hole in the student's mask: SAM fills it
    two_class = torch.stack([1.0 - pred, pred.float()], dim=1)  # logits whose argmax is pred
    images = torch.cat([image, image])
    logits = torch.cat([two_class, torch.zeros_like(two_class).index_fill_(1, torch.tensor([0]), 1.0)])
    labels, keep = m.sam_pseudo_labels(images, logits)
    assert keep.tolist() == [True, False]  # second image: the student predicts nothing
    print(
        f"\nLiteMedSAM pseudo-label Dice on the disk, from the student's box: {dice(labels[0].float(), disk):.3f}"
    )
    assert dice(labels[0].float(), disk) > 0.9
    assert labels[0, 40:50, 55:65].float().mean() > 0.9 and labels[0, :6, :6].sum() == 0
    assert labels[1].sum() == 0


def test_semisam_term_uses_the_pseudo_labels_of_prompted_images_only_with_a_ramp_down(monkeypatch):
    torch.manual_seed(0)
    m = SemiSAMMT(**{**method_config("semisam_mt")["init_args"], **TINY})
    b = batch()
    target = torch.zeros(2, 32, 32, dtype=torch.long)
    target[0, 5:15, 5:15] = 1
    monkeypatch.setattr(m, "sam_pseudo_labels", lambda images, logits: (target, torch.tensor([True, False])))
    torch.manual_seed(1)  # the same dropout draws in both student passes
    m.training_step(b, 0)
    torch.manual_seed(1)
    logits = m(torch.cat([b["labeled"]["image_weak"], b["unlabeled"]["image_weak"]]))[2:3]
    onehot = torch.nn.functional.one_hot(target[:1], 2).permute(0, 3, 1, 2).float()
    expected = ((torch.softmax(logits, 1) - onehot) ** 2).mean()
    torch.testing.assert_close(m._last_losses["sam"], expected.detach(), rtol=1e-4, atol=1e-6)
    # w_sam(t) = 0.05 exp(-5 (t/T)^2): 0.05 at the start, 0.05 e^-5 at the end (T = the run, 1 outside a trainer)
    assert m.sam_weight_now() == pytest.approx(0.05)
    monkeypatch.setattr(type(m), "global_step", property(lambda self: 1))
    assert m.sam_weight_now() == pytest.approx(0.05 * torch.exp(torch.tensor(-5.0)).item())


def test_semisam_step_trains_the_student_only_and_keeps_sam_out_of_the_state():
    torch.manual_seed(0)
    m = SemiSAMMT(**{**method_config("semisam_mt")["init_args"], **TINY})
    loss = m.training_step(batch(), 0)
    loss.backward()
    assert all(p.grad is not None for p in m.net.parameters())
    assert m.__dict__["_sam"] is not None  # built lazily outside a trainer
    assert not any(k.startswith(("_sam", "sam")) for k in m.state_dict())
    assert {n.split(".")[0] for n, _ in m.named_parameters()} == {"net", "teacher"}
    with pytest.raises(ValueError, match="teacher_checkpoint"):
        SemiSAMMT(teacher="medsam", **TINY)


# ------------------------------------------------------------------------------------------ CPC-SAM
def test_point_prompts_lie_in_the_largest_region_of_each_class():
    pred = torch.zeros(2, 40, 40, dtype=torch.long)
    pred[0, 5:25, 10:30] = 1  # the lesion's largest region
    pred[0, 32:36, 32:36] = 1  # a smaller one
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        centre, rand, labels = point_prompts(pred, generator=g)
        assert labels.tolist() == [[0, 1], [0, 0]]  # background negative, lesion positive; image 1 has none
        for pts in (centre, rand):
            x, y = pts[0, 1].long().tolist()
            assert 10 <= x < 30 and 5 <= y < 25  # inside the largest lesion region
            x, y = pts[0, 0].long().tolist()
            assert pred[0, y, x] == 0
        assert centre[0, 1].tolist() in (
            [19.0, 14.0],
            [20.0, 14.0],
            [19.0, 15.0],
            [20.0, 15.0],
        )  # centre-most
        assert torch.equal(centre[1, 1], centre[1, 0]) and torch.equal(
            rand[1, 1], centre[1, 0]
        )  # absent: bg copy
    assert to_model_frame(torch.tensor([[0.0, 63.0]]), (64, 64), 256).tolist() == [[1.5, 253.5]]


def test_cross_prompts_from_decoder_a_foreground_are_fed_to_decoder_b(cpc, monkeypatch):
    emb = cpc.net.encode(torch.rand(2, 3, 48, 48))[-1].detach()
    free_a = torch.zeros(2, 2, 48, 48)
    free_a[0, 1, 10:30, 12:40] = 5.0  # decoder A's lesion in image 0; none in image 1
    seen = []
    real = cpc.net.decode_one
    monkeypatch.setattr(
        cpc.net,
        "decode_one",
        lambda e, which, size, points=None: seen.append((which, points)) or real(e, which, size, points),
    )
    prompted, prompted_r = cpc.cross_prompted(emb, free_a, target=1, size=(48, 48))
    assert prompted.shape == prompted_r.shape == (2, 2, 48, 48)
    assert [w for w, _ in seen] == [1, 1]  # both prompted passes go to decoder B
    fg = free_a.argmax(1)
    for _, (coords, labels) in seen:
        assert labels.tolist() == [[0, 1], [0, 0]]
        xy = ((coords + 0.5) * 48 / 256 - 0.5).round().long()  # back to the 48 x 48 prediction frame
        assert fg[0, xy[0, 1, 1], xy[0, 1, 0]] == 1  # the positive point is in A's foreground
        assert fg[0, xy[0, 0, 1], xy[0, 0, 0]] == 0 and fg[1, xy[1, 0, 1], xy[1, 0, 0]] == 0
    # the prompt changes decoder B's output (the points reach its prompt encoder)
    free_b = real(emb, 1, (48, 48))
    assert not torch.allclose(prompted, free_b)


def test_litemedsams_batched_decoder_call_gives_the_per_image_logits(cpc):
    """One decoder call for the batch (LiteMedSAM) = one call per image (what MedSAM ViT-B needs), with and
    without point prompts, and each image's logits depend on its own prompt only."""
    assert cpc.net.batched_decoder
    torch.manual_seed(1)
    emb = cpc.net.encode(torch.rand(3, 3, 40, 40))[-1].detach()
    coords, labels = torch.rand(3, 2, 2) * 255, torch.tensor([[0, 1], [0, 0], [1, 1]])
    with torch.no_grad():
        for points in (None, (coords, labels)):
            batched = cpc.net.decode_one(emb, 1, (40, 40), points)
            cpc.net.batched_decoder = False
            try:
                looped = cpc.net.decode_one(emb, 1, (40, 40), points)
            finally:
                cpc.net.batched_decoder = True
            torch.testing.assert_close(batched, looped, rtol=1e-4, atol=1e-4)
        moved = (coords.clone(), labels)
        moved[0][2] = 255 - moved[0][2]  # image 2's prompt only
        again = cpc.net.decode_one(emb, 1, (40, 40), moved)
    torch.testing.assert_close(again[:2], batched[:2], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(again[2], batched[2])


def test_lora_wraps_every_qkv_and_starts_as_the_frozen_model():
    torch.manual_seed(0)
    for name, kwargs in (("litemedsam", {}), ("medsam", {"pretrained": False, **TINY_SAM})):
        frozen = build_teacher(name, **kwargs)
        x = torch.rand(1, 3, frozen.input_size, frozen.input_size)
        before = frozen.image_encoder(x)
        layers = add_lora(frozen.image_encoder, 4)
        n_attn = 10 if name == "litemedsam" else TINY_SAM["encoder_depth"]
        assert len(layers) == n_attn and all(
            isinstance(q, LoRAQKV) and q.a_q.out_features == 4 for q in layers
        )
        torch.testing.assert_close(frozen.image_encoder(x), before)  # B = 0: identity at initialisation
        for layer in layers:  # a non-zero B changes only q and v, never k
            torch.nn.init.normal_(layer.b_q.weight)
            torch.nn.init.normal_(layer.b_v.weight)
        probe = torch.randn(3, layers[0].qkv.in_features)
        q = layers[0]
        delta = (q(probe) - q.qkv(probe)).unflatten(-1, (q.groups, -1))
        kd = q.k_size
        qd = q.b_q.out_features // q.groups
        assert delta[..., qd : qd + kd].abs().max() == 0 and delta[..., :qd].abs().max() > 0
        assert delta[..., qd + kd :].abs().max() > 0


def test_only_lora_and_decoders_train_and_no_gradient_reaches_the_frozen_encoder(cpc):
    cpc.zero_grad(set_to_none=True)
    trainable = {n for n, p in cpc.named_parameters() if p.requires_grad}
    assert trainable and all(
        ".a_q." in n or ".b_q." in n or ".a_v." in n or ".b_v." in n or n.startswith("net.decoders.")
        for n in trainable
    )
    assert any(n.startswith("net.image_encoder.") for n in trainable)  # the LoRA layers
    assert not any(
        n.startswith("net.decoders.") and ("iou_prediction_head" in n or "hypernetworks_mlps.1" in n)
        for n in trainable
    )  # parts the single-mask output never uses
    # with the prompted rounds on (warm-up over), one step reaches every trainable parameter and nothing else
    cpc.hparams.warm_fraction = 0.0
    try:
        loss = cpc.training_step(batch(1, 1, size=32), 0)
    finally:
        cpc.hparams.warm_fraction = method_config("cpc_sam")["init_args"]["warm_fraction"]
    assert set(cpc._last_losses) >= {"sup", "prompted_sup1", "prompted_sup2", "cross1", "cross2"}
    loss.backward()
    assert not [n for n in trainable if dict(cpc.named_parameters())[n].grad is None]
    assert all(p.grad is None for n, p in cpc.named_parameters() if n not in trainable)
    assert (
        not cpc.net.image_encoder.training and cpc.net.decoders.training
    )  # TinyViT's BatchNorm stays frozen
    # the optimiser gets the trainable parameters only
    opt = torch.optim.AdamW([p for p in cpc.parameters() if p.requires_grad])
    assert sum(len(g["params"]) for g in opt.param_groups) == len(trainable)
    cpc.zero_grad(set_to_none=True)


def test_cpc_sam_net_gives_two_class_logits_at_the_input_size_and_the_warm_up_is_supervised_only(cpc):
    assert isinstance(cpc.net, SAMDualDecoder) and cpc.hparams.network == "sam_lora"
    with torch.no_grad():
        out = cpc(torch.rand(2, 3, 40, 56))
    assert out.shape == (2, 2, 40, 56)
    torch.testing.assert_close(out.exp().sum(1), torch.ones(2, 40, 56))
    loss = cpc.training_step(batch(1, 1, size=32), 0)  # step 0 < 1/6 of the run: L1 only
    assert set(cpc._last_losses) == {"sup", "loss"} and torch.isfinite(loss)
    with pytest.raises(ValueError, match="sam_lora"):
        CPCSAM(network="unet")
