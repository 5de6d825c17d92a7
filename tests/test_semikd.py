"""SemiKDModule: the three loss terms wired together, ablation switches, the student-only checkpoint,
and an end-to-end fit + test through the CLI on real Kvasir-SEG data with the teacher cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from lesion_kd.methods import SemiKDModule, load_student

REPO = Path(__file__).resolve().parents[1]


def batch(n_lab=2, n_unl=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)

    def part(n, labeled):
        theta = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).repeat(n, 1, 1)
        theta[0] = torch.tensor([[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # one flipped view
        mask = torch.zeros(n, size, size, dtype=torch.long)
        mask[:, 8:20, 10:24] = 1 if labeled else 0
        return {"image_weak": torch.rand(n, 3, size, size, generator=g),
                "image_strong": torch.rand(n, 3, size, size, generator=g), "mask": mask, "theta": theta,
                "teacher_emb": torch.randn(n, 256, 64, 64, generator=g).half(), "index": torch.arange(n),
                "id": [f"x{i}" for i in range(n)]}

    return {"labeled": part(n_lab, True), "unlabeled": part(n_unl, False)}


def module(**kw):
    args = {"network": "unet", "network_kwargs": {"channels": [8, 16, 32, 64, 128]}}
    args.update(kw)
    return SemiKDModule(**args)


def test_full_method_loss_is_finite_and_trains_student_and_projector_not_teacher():
    m = module()
    b = batch()
    b["labeled"]["teacher_emb"].requires_grad_(True)
    loss = m.training_step(b, 0)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert b["labeled"]["teacher_emb"].grad is None
    assert all(p.grad is not None for p in m.net.parameters() if p.requires_grad)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.pckd.parameters())


@pytest.mark.parametrize(
    "row,kd,dss",
    [("sup", False, False), ("featkd", True, False), ("map", True, False), ("pckd", True, False), ("dss", False, True),
     ("", True, True)],
)
def test_each_ablation_config_switches_the_right_terms(row, kd, dss):
    cfg = yaml.safe_load((REPO / "experiments" / "method" / f"semikd{'_' + row if row else ''}.yaml").read_text())
    init = dict(cfg["model"]["init_args"])
    init["network"], init["network_kwargs"] = "unet", {"channels": [8, 16, 32, 64, 128]}
    m = SemiKDModule(**init)
    assert (m.pckd is not None) == kd and (m.dss is not None) == dss
    if row in ("featkd", "map"):
        assert m.pckd.mode == row


def test_contrast_min_area_reaches_the_contrast_term():
    """model.contrast_min_area: above the untrained student's predicted lesion area (it never covers every
    pixel), the contrast term has no image left and is exactly 0; by default it counts every image."""
    default = module()
    assert default.dss.contrast_min_area == 0.0
    default.training_step(batch(), 0)
    assert default._last_losses["dss_contrast"] != 0
    m = module(contrast_min_area=1.0)
    assert m.dss.contrast_min_area == 1.0
    m.training_step(batch(), 0)
    assert m._last_losses["dss_contrast"] == 0


def test_the_alignment_weight_defaults_to_10_in_the_class_and_the_method_config():
    """gamma2 = 0.1 let the lesion class spread over the unlabeled images (experiments/results/diagnostics/)."""
    cfg = yaml.safe_load((REPO / "experiments/method/semikd.yaml").read_text())["model"]["init_args"]
    assert module().dss.gamma2 == 10.0 and cfg["gamma2"] == 10.0
    assert module(gamma2=0.1).dss.gamma2 == 0.1


def test_map_centered_is_the_default_and_can_be_switched_off():
    assert module().pckd.centered is True and module(map_centered=False).pckd.centered is False


def test_the_relational_map_term_is_off_by_default_and_adds_to_the_step_loss_when_weighted():
    assert module().pckd.relation_weight == 0.0

    def step_loss(weight):
        torch.manual_seed(0)
        m = module(map_relation_weight=weight, perturbation="none", use_dss=False, ramp_fraction=0.0)
        return m.training_step(batch(), 0)

    without, with_rel = step_loss(0.0), step_loss(1.0)
    assert with_rel.item() > without.item() + 1e-4
    with pytest.raises(ValueError, match="model.map_relation_weight"):
        module(map_relation_weight=-0.5)


def test_dss_defaults_are_the_labeled_prior_and_the_bounded_contrast_and_reach_the_loss():
    """Defaults changed after the BUSI diagnostics (experiments/results/diagnostics/README.md); method.md's
    literal forms stay one option away, and the chosen form changes the logged contrast value."""
    default, literal = module(), module(dss_balance_area="batch", contrast_form="log")
    assert (default.dss.balance_area, default.dss.contrast_form) == ("labeled", "softplus")
    assert (literal.dss.balance_area, literal.dss.contrast_form) == ("batch", "log")
    literal.load_state_dict(default.state_dict())
    torch.manual_seed(0)
    default.training_step(batch(), 0)
    torch.manual_seed(0)
    literal.training_step(batch(), 0)
    sp, lg = default._last_losses["dss_contrast"], literal._last_losses["dss_contrast"]
    assert sp >= 0 and sp > lg  # log(1 + 1/r) = -log r + log(1 + r) > -log r


def test_align_stats_reach_the_alignment_term():
    """All four statistics by default (method.md); an area-only alignment gives a smaller alignment loss on
    the same step and the same weights, since it drops the confidence gaps."""
    full, area = module(), module(align_stats=("area_mean", "area_var"))
    assert full.dss.alignment.stats == ("area_mean", "area_var", "conf_mean", "conf_var")
    assert area.dss.alignment.stats == ("area_mean", "area_var")
    area.load_state_dict(full.state_dict())
    for m in (full, area):  # a first step fills the labeled statistics; the second compares against them
        torch.manual_seed(0)
        m.training_step(batch(seed=1), 0)
        torch.manual_seed(0)
        m.training_step(batch(seed=2), 1)
    assert 0 < area._last_losses["dss_align"] < full._last_losses["dss_align"]


def test_full_method_step_runs_under_bf16_autocast_on_cpu():
    # the cpu profile trains in bf16-mixed: every term must have a bf16 CPU path
    m = module()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m.training_step(batch(size=64), 0)
    assert torch.isfinite(loss)
    loss.backward()


def test_zero_weights_leave_exactly_the_supervised_loss():
    b = batch()
    torch.manual_seed(0)
    m = module(lambda_kd=0.0, lambda_dss=0.0, network_kwargs={"channels": [8, 16, 32, 64, 128], "dropout": [0.0] * 5})
    total = m.training_step(b, 0)
    weak = torch.cat([b["labeled"]["image_weak"], b["unlabeled"]["image_weak"]])
    sup = m.supervised_loss(m.net(weak)[:2], b["labeled"]["mask"])
    assert torch.allclose(total, sup, atol=1e-6)
    torch.manual_seed(0)  # the same student initialisation as m
    m2 = module(lambda_kd=2.0, lambda_dss=0.0, ramp_fraction=0.0,
                network_kwargs={"channels": [8, 16, 32, 64, 128], "dropout": [0.0] * 5})
    assert m2.training_step(b, 0) > sup  # a positive weight adds the (positive) distillation term


def test_invalid_options_name_themselves():
    with pytest.raises(ValueError, match="model.lambda_kd"):
        module(lambda_kd=-1)
    with pytest.raises(ValueError, match="model.teacher_checkpoint"):
        module(teacher="medsam")
    with pytest.raises(ValueError, match=r"model.teacher_checkpoint='/no/such/medsam_vit_b.pth': file not found"):
        module(teacher="medsam", teacher_checkpoint="/no/such/medsam_vit_b.pth")


def test_checkpoint_holds_no_teacher_and_loads_as_a_plain_student(tmp_path):
    m = module()
    assert not any(k.startswith(("teacher", "_teacher")) for k in m.state_dict())
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": m.state_dict(), "hyper_parameters": dict(m.hparams)}, path)
    net = load_student(str(path))
    x = torch.rand(1, 3, 32, 32)
    m.eval()
    assert type(net).__name__ == "UNet" and torch.allclose(net(x), m.net(x))


@pytest.mark.slow
def test_cache_teacher_command_fills_the_cache_for_an_experiment(data_dir, tmp_path):
    from helpers import lesion_kd

    # a cache of its own: other tests of the session cache other images (val/test ones) in the shared one
    env = {"LESION_KD_DATA": str(data_dir), "LESION_KD_CACHE": str(tmp_path / "cache")}
    args = ("cache-teacher", "--config", "experiments/data/kvasir-seg.yaml", "--config", "experiments/profile/smoke.yaml")
    out = lesion_kd(*args, env_extra=env, timeout=600)
    assert "teacher cache ready: 16 images of kvasir-seg (train)" in out.stdout
    cache_dir = Path(out.stdout.split(" in ")[-1].strip())
    entries = sorted(cache_dir.rglob("*.emb"))
    assert len(entries) == 16
    mtimes = [p.stat().st_mtime_ns for p in entries]
    lesion_kd(*args, env_extra=env)  # a second call resumes: nothing recomputed
    assert [p.stat().st_mtime_ns for p in entries] == mtimes


@pytest.mark.slow
def test_semikd_smoke_fit_and_test_through_the_cli(tmp_path, data_dir):
    from helpers import lesion_kd, run_dir_of

    env = {"LESION_KD_DATA": str(data_dir)}  # the teacher cache of the test above is reused (same $LESION_KD_CACHE)
    out = lesion_kd("fit", "--config", "experiments/data/kvasir-seg.yaml", "--config", "experiments/method/semikd.yaml",
                    "--config", "experiments/profile/smoke.yaml", "--trainer.default_root_dir", str(tmp_path / "fit"),
                    env_extra=env, timeout=600)
    run = run_dir_of(tmp_path / "fit")
    header = (run / "metrics.csv").read_text().splitlines()[0]
    for term in ("train/sup", "train/pckd", "train/kd_map", "train/kd_resp", "train/dss", "train/dss_cons",
                 "train/dss_align", "train/dss_contrast", "train/ramp", "train/area_unlabeled", "train/area_labeled",
                 "train/conf_unlabeled", "train/conf_labeled"):
        assert term in header
    import csv

    areas = [float(r[k]) for r in csv.DictReader((run / "metrics.csv").open())
             for k in ("train/area_unlabeled", "train/area_labeled", "train/conf_unlabeled", "train/conf_labeled")
             if r.get(k)]
    assert areas and all(0.0 <= a <= 1.0 for a in areas)
    assert "metrics written to" in out.stdout
    ckpt = next((run / "checkpoints").glob("best-*.ckpt"))
    out = lesion_kd("test", "--config", str(run / "config.yaml"), "--ckpt_path", str(ckpt),
                    "--trainer.default_root_dir", str(tmp_path / "test"), env_extra=env)
    assert json.loads(Path(out.stdout.split("metrics written to ")[1].split()[0]).read_text())["n_images"] == 8
    net = load_student(str(ckpt))
    assert type(net).__name__ == "MambaUNet"


@pytest.mark.parametrize("row", ["semikd", "semikd_sup", "semikd_featkd", "semikd_map", "semikd_pckd", "semikd_dss"])
def test_each_ablation_config_publishes_its_results_under_its_own_name(row):
    args = yaml.safe_load((Path(__file__).parents[1] / f"experiments/method/{row}.yaml").read_text())["model"]["init_args"]
    module = SemiKDModule(**{**args, "teacher_mode": "cache"})
    assert module.results_name == row


def test_aligned_coarse_matches_the_full_warp_then_resize_and_costs_a_pooled_grid():
    # issue 29's cheap teacher side: pool -> warp at the pooled grid -> resize, against the full 64x64 warp -> resize
    from lesion_kd.losses.pckd import resize_features
    from lesion_kd.teacher_cache import aligned, aligned_coarse

    g = torch.Generator().manual_seed(0)
    # a smooth embedding (the teacher's is spatially correlated): low-frequency fields upsampled to 64x64
    emb = resize_features(torch.randn(4, 256, 8, 8, generator=g), (64, 64)).half()
    theta = torch.eye(2, 3).repeat(4, 1, 1)
    theta[1, 0, 0] = -1.0  # horizontal flip
    theta[2] = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0]])  # rot90
    theta[3] = torch.tensor([[0.6, 0.0, 0.2], [0.0, 0.6, -0.3]])  # a crop
    for grid in [(5, 5), (8, 8), (16, 16)]:
        coarse = aligned_coarse(emb, theta, grid)
        full = resize_features(aligned(emb, theta, (64, 64)), grid)
        assert coarse.shape == (4, 256, *grid) and coarse.dtype == torch.float32
        cos = torch.nn.functional.cosine_similarity(coarse, full, dim=1)
        assert cos.min() > 0.999, (grid, cos.min())
    # the identity view at the teacher's own grid is the embedding itself (no pooling: 32 is under 4x the target)
    assert torch.allclose(aligned_coarse(emb[:1], torch.eye(2, 3)[None], (64, 64)), emb[:1].float(), atol=1e-3)


def test_kd_grid_student_feeds_the_projector_on_the_students_grid_and_trains_it():
    b = batch(size=64)
    seen = {}
    m = module(kd_grid="student", ramp_fraction=0.0)
    forward = m.pckd.forward

    def spy(feats, emb, decode=None):
        seen["emb"], seen["f_s"] = tuple(emb.shape), tuple(feats[-1].shape)
        return forward(feats, emb, decode)

    m.pckd.forward = spy
    loss = m.training_step(b, 0)
    loss.backward()
    assert seen["emb"][2:] == seen["f_s"][2:] and seen["emb"][1] == 256  # the teacher's channels, the student's grid
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.pckd.projector.parameters())
    # the default keeps the committed runs' 64x64 path
    m2 = module(ramp_fraction=0.0)
    m2.pckd.forward = spy
    m2.training_step(b, 0)
    assert seen["emb"][2:] == (64, 64)
    # an older checkpoint (no kd_grid) resumes as the 64x64 path
    assert SemiKDModule.NEUTRAL_ADDED_OPTIONS["kd_grid"] == "teacher"


def test_the_methods_config_uses_the_students_grid_and_semikd_plus_keeps_its_runs_path():
    def init(name):
        return yaml.safe_load((REPO / "experiments" / "method" / f"{name}.yaml").read_text())["model"]["init_args"]

    assert init("semikd")["kd_grid"] == "student"
    assert init("semikd_plus").get("kd_grid", "teacher") == "teacher"
