"""The Mamba student: size, interface shared with the reference U-Net, sizes it accepts, gradients,
global four-direction mixing of its VSS block, and the loop-free path used for export."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lesion_kd.models import build_model, list_models
from lesion_kd.models.mamba_unet import ConvBN, MambaUNet, Pointwise
from lesion_kd.models.vss import VSSBlock, scan_orders_to_sequence, sequence_to_scan_orders


@pytest.fixture(scope="module")
def student() -> MambaUNet:
    torch.manual_seed(0)
    return build_model("mamba_unet")


def test_registered_and_built_by_name(student):
    assert "mamba_unet" in list_models()
    assert isinstance(student, MambaUNet)


def test_parameter_count_is_the_papers_1_34_million(student):
    n = sum(p.numel() for p in student.parameters())
    assert 1.25e6 <= n <= 1.45e6, n
    assert abs(n - 1.34e6) < 0.02e6, n


def test_at_most_one_gflop_per_256x256_image(student):
    student.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        student(torch.randn(1, 3, 256, 256))
    assert counter.get_total_flops() <= 1.0e9


def _forward_backward(model, x):
    model.train()
    model.zero_grad()
    logits = model(x)
    assert logits.shape == (x.shape[0], 2, *x.shape[-2:])
    target = torch.randint(0, 2, (x.shape[0], *x.shape[-2:]))
    torch.nn.functional.cross_entropy(logits, target).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    # Every parameter takes part (in particular the scan's A_log, D, dt_bias and projections).
    unused = [n for n, g in grads.items() if g.abs().sum() == 0]
    assert not unused, unused


def test_forward_backward_at_256x256(student):
    _forward_backward(student, torch.randn(2, 3, 256, 256))


def test_forward_backward_at_non_square_224x288(student):
    _forward_backward(student, torch.randn(2, 3, 224, 288))


def test_sides_not_multiple_of_32_are_rejected(student):
    with pytest.raises(ValueError, match="multiples of 32"):
        student(torch.randn(1, 3, 240, 256))


def test_forward_equals_decode_of_encode_and_feature_interface(student):
    student.eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        feats = student.encode(x)
        logits = student(x)
        assert torch.equal(logits, student.decode(feats))
        logits2, last = student.decode(feats, return_features=True)
    assert torch.equal(logits, logits2)
    assert last.shape == (2, student.feature_channels[0], 64, 96)
    assert tuple(f.shape[1] for f in feats) == student.feature_channels
    assert [f.shape[-1] for f in feats] == [96 // 2**i for i in range(len(feats))]  # deepest last


def test_deepest_feature_can_be_replaced_before_decoding(student):
    """Distillation decodes a projected teacher feature in place of the deepest student feature."""
    student.eval()
    with torch.no_grad():
        feats = student.encode(torch.randn(1, 3, 64, 64))
        out = student.decode(feats)
        projected = torch.randn(feats[-1].shape)  # plain NCHW memory, as a projector would give
        replaced = student.decode(feats[:-1] + [projected])
        replaced_cl = student.decode(feats[:-1] + [projected.contiguous(memory_format=torch.channels_last)])
    assert replaced.shape == out.shape
    assert not torch.allclose(replaced, out)
    torch.testing.assert_close(replaced, replaced_cl)


def test_constructor_keywords():
    m = build_model("mamba_unet", in_channels=1, num_classes=3)
    with torch.no_grad():
        assert m.eval()(torch.randn(1, 1, 32, 32)).shape == (1, 3, 32, 32)


def test_scan_orders_are_row_column_and_their_reverses():
    h, w = 3, 4
    pos = torch.arange(h * w).view(1, h, w, 1, 1).expand(1, h, w, 4, 1)  # token index, row-major
    seq = scan_orders_to_sequence(pos)[:, 0, :, 0]  # (L, 4): which token each group reads at step t
    row_major = torch.arange(h * w)
    col_major = torch.arange(h * w).view(h, w).t().reshape(-1)
    assert torch.equal(seq[:, 0], row_major)
    assert torch.equal(seq[:, 1], col_major)
    assert torch.equal(seq[:, 2], row_major.flip(0))
    assert torch.equal(seq[:, 3], col_major.flip(0))
    x = torch.randn(2, h, w, 4, 5)
    assert torch.equal(sequence_to_scan_orders(scan_orders_to_sequence(x), h, w), x)


@pytest.mark.parametrize("corner", ["top-left", "top-right", "bottom-left", "bottom-right"])
def test_vss_block_mixes_each_corner_into_the_opposite_corner(corner):
    """A 1D causal scan in one order cannot carry the last token to the first; the block's four
    orders must carry every corner to the opposite one (and the depthwise conv only reaches 1 pixel)."""
    torch.manual_seed(0)
    h, w, c = 6, 5, 16
    block = VSSBlock(c).double().eval()
    x = torch.randn(1, h, w, c, dtype=torch.float64)
    i, j = {"top-left": (0, 0), "top-right": (0, w - 1), "bottom-left": (h - 1, 0), "bottom-right": (h - 1, w - 1)}[
        corner
    ]
    xp = x.clone()
    xp[0, i, j] += torch.randn(c, dtype=torch.float64)  # not a constant shift: LayerNorm would remove that
    with torch.no_grad():
        change = (block(xp) - block(x))[0, h - 1 - i, w - 1 - j].abs().max().item()
    assert change > 1e-9


def test_vss_block_chunked_scan_equals_recurrence():
    """The export path (chunked scan) and the eager recurrence give the same block output and gradients."""
    torch.manual_seed(0)
    blocks = {b: VSSBlock(16, scan_backend=b).double() for b in ("torch", "chunked")}
    blocks["chunked"].load_state_dict(blocks["torch"].state_dict())
    x = torch.randn(2, 8, 6, 16, dtype=torch.float64)
    outs = {}
    for name, blk in blocks.items():
        xi = x.clone().requires_grad_()
        y = blk(xi)
        y.square().sum().backward()
        outs[name] = (y.detach(), xi.grad, blk.mixer.A_log.grad)
    for a, b in zip(outs["chunked"], outs["torch"], strict=True):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-10)


def test_vss_block_exports_with_torch_export():
    """torch.export (what torch.onnx.export builds on) captures the block without a per-token loop."""
    torch.manual_seed(0)
    block = VSSBlock(16).eval()
    x = torch.randn(1, 16, 16, 16)
    with torch.no_grad():
        program = torch.export.export(block, (x,))
        ops = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
        assert not any("addcmul" in op for op in ops)
        assert len(ops) < 16 * 16  # far fewer ops than tokens
        torch.testing.assert_close(program.module()(x), block(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["conv3x3", "depthwise", "pointwise"])
def test_batchnorm_folded_at_inference_equals_conv_then_batchnorm(kind):
    torch.manual_seed(0)
    conv = {
        "conv3x3": torch.nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=True),
        "depthwise": torch.nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False),
        "pointwise": Pointwise(6, 5, bias=False),
    }[kind]
    layer = ConvBN(conv).double()
    x = torch.randn(3, conv.in_channels if kind != "pointwise" else 6, 8, 8, dtype=torch.float64)
    layer.train()
    for _ in range(3):  # non-trivial running statistics
        layer(x * 2 + 1)
    torch.nn.init.normal_(layer.bn.weight)
    torch.nn.init.normal_(layer.bn.bias)
    layer.eval()
    with torch.no_grad():
        folded = layer(x)
        reference = layer.bn(layer.conv(x))
    torch.testing.assert_close(folded, reference, rtol=1e-10, atol=1e-10)
