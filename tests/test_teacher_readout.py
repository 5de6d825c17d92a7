"""The teacher's own read-out (issue 28): a light head on the frozen LiteMedSAM embeddings, fitted on the labeled
images only, evaluated like any other method (results name ``teacher``, network ``litemedsam``)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from lesion_kd.models import build_model


def test_the_head_fits_a_separable_embedding():
    """A known separable case: one embedding channel is +1 inside the lesion and -1 outside, the others noise;
    the head (and the linear probe variant) must recover the lesion on held-out embeddings."""
    g = torch.Generator().manual_seed(0)

    def make(n):
        emb = torch.randn(n, 256, 16, 16, generator=g) * 0.05
        yy, xx = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
        masks = []
        for i in range(n):
            cy, cx, r = 4 + i % 8, 4 + (3 * i) % 8, 3 + i % 3
            m = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).long()
            emb[i, 7] = m.float() * 2 - 1
            masks.append(m)
        return emb, torch.stack(masks)

    x_train, y_train = make(48)
    x_test, y_test = make(6)
    for hidden in (64, 0):
        torch.manual_seed(0)
        head = build_model("litemedsam", num_classes=2, hidden=hidden)
        opt = torch.optim.Adam(head.parameters(), lr=0.01)
        for _ in range(150):
            opt.zero_grad()
            F.cross_entropy(head(x_train), y_train).backward()
            opt.step()
        head.eval()
        pred = head(x_test).argmax(1)
        dice = (2 * (pred * y_test).sum() / (pred.sum() + y_test.sum())).item()
        assert dice > 0.95, (hidden, dice)


def test_the_head_refuses_an_image_for_an_embedding():
    with pytest.raises(ValueError, match=r"expects a \(B, 256, h, w\) teacher embedding"):
        build_model("litemedsam")(torch.zeros(1, 3, 64, 64))


@pytest.mark.slow
def test_smoke_fit_of_the_teacher_readout_lands_as_a_teacher_row(tmp_path, data_dir):
    from helpers import lesion_kd

    out = lesion_kd("fit", "--config", "experiments/data/kvasir-seg.yaml", "--config", "experiments/method/teacher.yaml",
                    "--config", "experiments/profile/smoke.yaml", "--trainer.default_root_dir", str(tmp_path / "runs"),
                    "--results_root", str(tmp_path / "results"), env_extra={"LESION_KD_DATA": str(data_dir)}, timeout=900)
    cell = tmp_path / "results" / "kvasir-seg" / "teacher-litemedsam-10pct-seed0"
    metrics = json.loads((cell / "metrics.json").read_text())
    assert metrics["n_images"] == 8 and 0.0 <= metrics["dice"]["mean"] <= 1.0
    (last,) = (tmp_path / "runs").rglob("last.ckpt")
    state = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    assert all(k.startswith("net.") for k in state)  # the head only: the frozen teacher is not in the checkpoint
    assert sum(v.numel() for v in state.values()) < 200_000
    assert "test (8 images)" in out.stdout
