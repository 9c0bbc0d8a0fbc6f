"""PPC-L: the weighting PointNet, learning through the PPC solver, the model file, registration use."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from reg2d3d_ros.errors import ConfigError, ModelLoadError
from reg2d3d_ros.geometry import transform_points
from reg2d3d_ros.nets import CorrespondenceWeightNet, modified_softsign
from reg2d3d_ros.ppc import PPCConfig, motion_about
from reg2d3d_ros.ppcl import N_FEATURES, LearnedWeighting
from reg2d3d_ros.ppcl.train import PPCLTrainConfig, Sample, train_level, update_and_error

K = torch.tensor([[850.0, 0.0, 128.0], [0.0, 850.0, 128.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
REPO = Path(__file__).resolve().parents[1]


def test_modified_softsign_maps_to_unit_interval():
    x = torch.linspace(-1e4, 1e4, 1001)
    y = modified_softsign(x)
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    assert abs(float(modified_softsign(torch.zeros(()))) - 0.5) < 1e-7
    assert bool((y[1:] >= y[:-1]).all())


def test_pointnet_is_permutation_equivariant_and_respects_the_mask():
    torch.manual_seed(0)
    net = CorrespondenceWeightNet(N_FEATURES).eval()
    f = torch.randn(2, 50, N_FEATURES)
    perm = torch.randperm(50)
    w = net(f)
    assert w.shape == (2, 50) and bool((w > 0).all())
    assert torch.allclose(net(f[:, perm]), w[:, perm], atol=1e-6)
    mask = torch.ones(2, 50, dtype=torch.bool)
    mask[:, 40:] = False
    wm = net(f, mask)
    assert bool((wm[:, 40:] == 0).all())
    # masked points do not reach the global feature: changing them changes nothing else
    f2 = f.clone()
    f2[:, 40:] = 100.0
    assert torch.allclose(net(f2, mask)[:, :40], wm[:, :40], atol=1e-6)
    assert torch.allclose(net(f[:, :40]), wm[:, :40], atol=1e-6)


def _synthetic_sample(rng: np.random.Generator, outlier_fraction=0.4) -> Sample:
    """A PPC problem with a known motion; outliers are recognisable only by their features (low 'NGC')."""
    n = 200
    w = torch.from_numpy(np.array([0.0, 0.0, 700.0]) + rng.normal(size=(n, 3)) * [25.0, 25.0, 15.0])
    r = w / w.norm(dim=-1, keepdim=True)
    g = torch.from_numpy(rng.normal(size=(n, 3)))
    g = g - (g * r).sum(-1, keepdim=True) * r
    g = g / g.norm(dim=-1, keepdim=True)
    dv = torch.from_numpy(np.concatenate([rng.normal(size=3) * 0.01, rng.normal(size=3) * [3.0, 3.0, 2.0]]))
    M = motion_about(dv[None], w.mean(0)[None])[0]
    q = transform_points(M, w) @ K.T
    uv = q[:, :2] / q[:, 2:]
    bad = torch.from_numpy(rng.uniform(size=n) < outlier_fraction)
    uv[bad] += torch.from_numpy(rng.uniform(-20, 20, size=(int(bad.sum()), 2)))
    score = torch.where(bad, torch.from_numpy(rng.uniform(0.0, 0.4, n)), torch.from_numpy(rng.uniform(0.5, 1.0, n)))
    feats = torch.zeros(n, N_FEATURES, dtype=torch.float32)
    feats[:, 11] = score.float()  # the NGC column
    feats[:, :2] = torch.from_numpy(rng.normal(size=(n, 2))).float()  # nuisance features
    # the ground truth is the motion itself: T_gt = M T_start with T_start = identity (optical = CT frame)
    T0 = torch.eye(4, dtype=torch.float64)
    tgt = w[:50].clone()
    return Sample(features=feats, w_opt=w, g_opt=g, uv_corr=uv, K=K, noise_mm=700.0 / 850.0, T_start=T0, T_gt=M, K_full=K,
                  target_pts=tgt, group="synthetic")


def test_learning_through_the_solver_finds_the_outliers():
    """No per-correspondence labels: only the projection error after the solve teaches the weights."""
    rng = np.random.default_rng(0)
    train = [_synthetic_sample(rng) for _ in range(48)]
    val = [_synthetic_sample(rng) for _ in range(16)]
    cfg = PPCConfig(prior_rot_deg=10.0, prior_trans_mm=(50.0, 50.0, 50.0))
    net0 = CorrespondenceWeightNet(N_FEATURES)
    with torch.no_grad():
        before, _ = update_and_error(net0.eval(), val, cfg, 256, np.random.default_rng(1))
    net, hist = train_level(train, val, cfg, PPCLTrainConfig(epochs=25, batch=8, n_points=256, lr=3e-3), progress=False)
    with torch.no_grad():
        after, start = update_and_error(net, val, cfg, 256, np.random.default_rng(1))
    assert float(after.mean()) < 0.3 * float(before.mean()), (float(before.mean()), float(after.mean()))
    assert float(after.mean()) < 0.2 * float(start.mean())
    # the learned weights separate the outliers by their feature
    s = val[0]
    with torch.no_grad():
        wts = net(s.features[None])[0]
    score = s.features[:, 11]
    assert float(wts[score < 0.45].mean()) < 0.3 * float(wts[score >= 0.45].mean())
    assert len(hist) == 25 and hist[-1]["val_log_ratio"] < hist[0]["val_log_ratio"]


def test_training_resumes_from_its_checkpoint(tmp_path):
    rng = np.random.default_rng(3)
    train = [_synthetic_sample(rng) for _ in range(8)]
    val = [_synthetic_sample(rng) for _ in range(4)]
    cfg = PPCConfig()
    ck = tmp_path / "ck.ckpt"
    _, h1 = train_level(train, val, cfg, PPCLTrainConfig(epochs=2, batch=4, n_points=128), checkpoint=ck, progress=False)
    _, h2 = train_level(train, val, cfg, PPCLTrainConfig(epochs=4, batch=4, n_points=128), checkpoint=ck, progress=False)
    assert len(h1) == 2 and len(h2) == 4 and h2[:2] == h1


def test_model_file_round_trip_and_clear_errors(tmp_path):
    torch.manual_seed(0)
    nets = {0.25: CorrespondenceWeightNet(N_FEATURES), 1.0: CorrespondenceWeightNet(N_FEATURES)}
    lw = LearnedWeighting(nets, {"local": [32, 64], "head": [64, 32]})
    lw.save(tmp_path / "ppcl.pt")
    back = LearnedWeighting.load(tmp_path / "ppcl.pt")
    assert back.levels == (0.25, 1.0)
    f = torch.randn(1, 30, N_FEATURES)
    assert torch.allclose(back.net_for(0.25)(f), nets[0.25].eval()(f))
    with pytest.raises(ConfigError, match="no network for resolution level 0.5"):
        back.net_for(0.5)
    with pytest.raises(ModelLoadError, match="does not exist"):
        LearnedWeighting.load(tmp_path / "missing.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match="cannot be read"):
        LearnedWeighting.load(tmp_path / "corrupt.pt")
    torch.save({"format": "something else"}, tmp_path / "foreign.pt")
    with pytest.raises(ModelLoadError, match="not a PPC-L model"):
        LearnedWeighting.load(tmp_path / "foreign.pt")


def test_learned_configuration_without_a_model_is_a_clear_error(tuning_case):
    from reg2d3d_ros.ppc import PPCL_PLUS_CONFIG

    ct, case, reg = tuning_case
    reg.learned = None
    with pytest.raises(ConfigError, match="no PPC-L model is loaded"):
        reg.register(case.image_att, case.intrinsics, case.T_gt, config=PPCL_PLUS_CONFIG)


@pytest.fixture(scope="module")
def tuning_case():  # noqa: D103
    from reg2d3d_ros.eval.cases import CaseSet, make_cases
    from reg2d3d_ros.example import load_example
    from reg2d3d_ros.ppc import PPCRegistrator

    ct = load_example()
    case = make_cases(ct, CaseSet("t", ("T9",), views=("lateral",), seed=1003), 1)[0]
    return ct, case, PPCRegistrator.from_ct(ct, "T9")


def test_committed_ppcl_model_registers_from_15mm(tuning_case):
    """The committed PPC-L model (hybrid use) brings 15 mm starts (rotation <= 5 deg) to success on a tuning case."""
    from reg2d3d_ros.eval import mrpd, random_starts
    from reg2d3d_ros.ppc import PPCL_HYBRID_CONFIG

    ct, case, reg = tuning_case
    reg.learned = LearnedWeighting.load(REPO / "models" / "ppcl" / "ppcl.pt")
    starts, _ = random_starts(case.T_gt, case.target_pts, 3, min_mtre_mm=14.0, max_mtre_mm=16.0, seed=5, max_rotation_deg=5.0)
    ok = 0
    for k in range(3):
        r = reg.register(case.image_att, case.intrinsics, starts[k], config=PPCL_HYBRID_CONFIG)
        after = float(mrpd(r.T_optical_from_ct, case.T_gt, case.target_pts))
        ok += after < 2.0
        assert any(h.get("learned") for h in r.history) and not r.history[-1].get("learned")
    assert ok >= 2, f"{ok}/3 starts registered"
    assert math.isfinite(r.inlier_fraction)
