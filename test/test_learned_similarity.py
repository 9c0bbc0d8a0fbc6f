"""The correlation-driven learned similarity: the network (invertible local branch, intensity
invariance, twice differentiable), the pose-gradient loss and its cached Jacobians (checked
against autograd through the renderer), training (the loss falls on seeded samples), the model
file, and its use as the ``learned`` metric of intensity registration and of the pipeline."""

import math

import numpy as np
import pytest
import torch

from reg2d3d_ros.errors import ConfigError, ModelLoadError
from reg2d3d_ros.intensity import IN_PLANE_DOF, IntensityConfig, IntensityRegistrator, perturb_about
from reg2d3d_ros.eval.starts import seed_like_perturbations
from reg2d3d_ros.similarity import LearnedSimilarity
from reg2d3d_ros.similarity.train import (
    IN_PLANE,
    ROT_RADIUS_MM,
    SimilarityTrainConfig,
    decomposition_loss,
    gradient_angle,
    losses,
    similarity_samples,
    train_similarity,
)
from reg2d3d_ros.nets.similarity import LocalINN, SimilarityNet


def small_net(size=32, seed=0):
    torch.manual_seed(seed)
    return SimilarityNet(input_size=size, channels=8, coupling_blocks=2, heads=2)


# ------------------------------------------------------------------------------------------ network
def test_local_branch_is_invertible():
    torch.manual_seed(0)
    inn = LocalINN(8, 8, 3)
    for b in inn.blocks:  # leave the identity start
        torch.nn.init.normal_(b.net[-1].weight, std=0.2)
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    inn = inn.double()
    y = inn(x)
    assert (y - x).abs().max() > 0.1
    assert torch.allclose(inn.inverse(y), x, atol=1e-10)


def test_network_shapes_invariance_and_errors():
    net = small_net().eval()
    g = torch.Generator().manual_seed(1)
    fixed, moving = torch.rand(1, 1, 32, 32, generator=g), torch.rand(3, 1, 32, 32, generator=g)
    d, feats = net(fixed, moving, return_features=True)
    assert d.shape == (3,) and bool(((d > 0) & (d < 1)).all())
    assert feats["local_x"].shape == (3, 8, 8, 8) and feats["global_m"].shape == (3, 8, 4, 4)
    # per-image standardisation: a positive gain and an offset of either image change nothing
    assert torch.allclose(net(3.0 * fixed + 7.0, 0.2 * moving - 1.0), d, atol=1e-5)
    with pytest.raises(ValueError, match="32"):
        net(torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 16))
    with pytest.raises(ValueError):
        SimilarityNet(input_size=30)


def test_gradient_angle():
    xi = torch.tensor([[0.02, -0.01, 0.03, 4.0, -2.0, 9.0]], dtype=torch.float64)
    s = torch.tensor([ROT_RADIUS_MM] * 3 + [1.0] * 3, dtype=torch.float64)
    # the geodesic loss |u|^2, u = s * xi, has the gradient 2 s^2 xi with respect to xi
    assert float(gradient_angle(2 * s * s * xi, xi)) == pytest.approx(0.0, abs=0.02)
    assert float(gradient_angle(-s * s * xi, xi)) == pytest.approx(math.pi, abs=0.02)
    # in the unscaled parameters the rotation part would be weighted wrongly: not aligned
    rot = torch.tensor([[0.05, -0.04, 0.03, 0.5, -0.2, 0.3]], dtype=torch.float64)
    assert float(gradient_angle(rot, rot)) > 1.0
    # only the in-plane parameters: the others may be anything
    g = 2 * s * s * xi
    g[0, [0, 1, 5]] = torch.tensor([5.0, -3.0, 1.0], dtype=torch.float64)
    assert float(gradient_angle(g, xi, dims=IN_PLANE)) == pytest.approx(0.0, abs=0.02)
    assert float(gradient_angle(g, xi)) > 0.5


def test_losses_are_twice_differentiable_and_bounded():
    net = small_net()
    g = torch.Generator().manual_seed(2)
    B = 4
    fixed, moving = torch.rand(B, 1, 32, 32, generator=g), torch.rand(B, 1, 32, 32, generator=g)
    jac = torch.randn(B, 6, 32, 32, generator=g)
    xi = torch.randn(B, 6, generator=g)
    out = losses(net, fixed, moving, jac, xi, SimilarityTrainConfig())
    assert out["appro"].shape == (B,) and bool(((out["appro"] >= 0) & (out["appro"] <= math.pi)).all())
    assert bool((out["decomp"] > 0).all()) and bool((out["decomp"] < 2.0 / 0.01 + 1).all())
    (out["appro"].mean() + out["decomp"].mean()).backward()
    grads = {n: p.grad for n, p in net.named_parameters()}
    assert all(v is not None and bool(torch.isfinite(v).all()) for v in grads.values())
    # the pose-gradient loss reaches the encoder and both heads through the second derivative
    for name in ("encoder.0.weight", "head_local.0.weight", "head_global.0.weight", "glob.qkv.weight"):
        assert float(grads[name].abs().sum()) > 0, name


def test_decomposition_loss_direction():
    a = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(3))
    same = {"global_x": a, "global_m": a, "local_x": a, "local_m": -a}
    opposite = {"global_x": a, "global_m": -a, "local_x": a, "local_m": a}
    # correlated global and anti-correlated local features are penalised; the reverse is rewarded
    assert bool((decomposition_loss(same) > 50).all()) and bool((decomposition_loss(opposite) < 0.01).all())


# ------------------------------------------------------------------------------------ sample data
@pytest.fixture(scope="module")
def t8():
    from reg2d3d_ros.eval.cases import CaseSet, make_cases
    from reg2d3d_ros.example import load_example

    ct = load_example()
    case = make_cases(ct, CaseSet("t", ("T8",), views=("ap",), seed=11), 1)[0]
    reg = IntensityRegistrator.from_ct(ct, "T8")
    return reg, case


def test_seed_like_perturbations_keep_the_target_in_view(t8):
    reg, case = t8
    rng = np.random.default_rng(0)
    xi, T = seed_like_perturbations(case.T_gt, reg.center_ct_mm, case.intrinsics, 40, rng)
    sd = np.array([math.radians(20)] * 3 + [30, 30, 60])
    assert xi.shape == (40, 6) and T.shape == (40, 4, 4)
    assert bool((xi.abs().numpy() <= 2 * sd + 1e-9).all())
    assert xi[:, 5].abs().max() > 40  # depth spreads wider than the rest
    c = reg.center_ct_mm
    p = T[:, :3, :3] @ c + T[:, :3, 3]
    K = case.intrinsics.K(torch.float64)
    u = K[0, 0] * p[:, 0] / p[:, 2] + K[0, 2]
    assert bool(((u >= 0.1 * case.intrinsics.width) & (u <= 0.9 * case.intrinsics.width)).all())
    small, _ = seed_like_perturbations(case.T_gt, reg.center_ct_mm, case.intrinsics, 40, rng, scale=0.1)
    assert bool((small.abs().numpy() <= 0.2 * sd + 1e-9).all())


def test_sample_jacobians_match_autograd_through_the_renderer(t8):
    """The cached finite-difference Jacobian J gives the same pose gradient J^T r as autograd."""
    reg, case = t8
    s = similarity_samples(reg, case.image_att, case.intrinsics, case.T_gt, 3, seed=5)
    assert similarity_samples(reg, case.image_att, case.intrinsics, case.T_gt, 1, seed=5)["xi"].shape == (1, 6)
    assert s["fixed"].shape == (128, 128) and s["moving"].shape == (3, 128, 128) and s["jac"].shape == (3, 6, 128, 128)
    assert s["jac"].dtype == torch.float16 and s["xi"].dtype == torch.float64
    intr = case.intrinsics.scaled(0.5)
    c_opt = reg._center_opt(case.T_gt)
    # a smooth weighting image: the exact derivative of the trilinear renderer is piecewise, the
    # finite difference averages it; both agree on what a network-like smooth cotangent sees
    scale = torch.tensor([ROT_RADIUS_MM] * 3 + [1.0] * 3, dtype=torch.float64)
    r = torch.nn.functional.interpolate(torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0)), size=(128, 128),
                                        mode="bilinear", align_corners=False)[0, 0]
    for k in range(3):
        xi = s["xi"][k].clone().requires_grad_(True)
        img = reg.render(perturb_about(xi[None], c_opt[None]) @ case.T_gt, intr)[0]
        assert torch.allclose(img.detach(), s["moving"][k], atol=1e-5)
        (g_auto,) = torch.autograd.grad((img * r).sum(), xi)
        g_fd = torch.einsum("khw,hw->k", s["jac"][k].double(), r.double())
        # compared in the scaled parameters of the loss (rotations per rad / rho): the out-of-plane
        # rotations change a DRR so little that their raw derivatives are dominated by sampling ripple.
        # The norms differ by up to ~20 %: autograd differentiates the piecewise-trilinear ray sum at
        # one point, the central difference averages it over +-0.5 mm / +-0.6 deg.
        g_auto, g_fd = g_auto / scale, g_fd / scale
        cos = float(torch.nn.functional.cosine_similarity(g_auto, g_fd, dim=0))
        assert cos > 0.98 and float(g_fd.norm() / g_auto.norm()) == pytest.approx(1.0, abs=0.25), (k, cos)


def test_training_lowers_the_angle_and_keeps_the_best_epoch(t8, tmp_path):
    reg, case = t8
    train = [similarity_samples(reg, case.image_att, case.intrinsics, case.T_gt, 24, seed=1, level=0.25)]
    val = [similarity_samples(reg, case.image_att, case.intrinsics, case.T_gt, 8, seed=2, level=0.25)]
    cfg = SimilarityTrainConfig(epochs=6, batch_size=8, lr=3e-3, input_size=64, channels=8, coupling_blocks=1, heads=2)
    model, hist = train_similarity(train, val, cfg, checkpoint=tmp_path / "s.ckpt", progress=False)
    assert len(hist) == 6 and isinstance(model, LearnedSimilarity)
    assert hist[-1]["train_angle_deg"] < hist[0]["train_angle_deg"] - 5.0, [h["train_angle_deg"] for h in hist]
    best = min(range(6), key=lambda i: hist[i]["val_angle_mean_deg"])
    assert model.meta["best_epoch"] == best
    # resuming a finished training does nothing more and returns the same model
    again, hist2 = train_similarity(train, val, cfg, checkpoint=tmp_path / "s.ckpt", progress=False)
    assert len(hist2) == 6
    x = torch.rand(2, 64, 64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(again(x, x[0]), model(x, x[0]))
    # a checkpoint of another set-up is refused, not silently mixed
    with pytest.raises(ConfigError, match="another training set-up"):
        train_similarity(train, val, SimilarityTrainConfig(**{**cfg.__dict__, "channels": 16}), checkpoint=tmp_path / "s.ckpt", progress=False)


# ------------------------------------------------------------------------------- model file, metric
def test_model_file_roundtrip_and_errors(tmp_path):
    model = LearnedSimilarity(small_net(), {"note": "test"})
    path = tmp_path / "similarity.pt"
    model.save(path)
    back = LearnedSimilarity.load(path)
    assert back.meta == {"note": "test"} and back.input_size == 32
    g = torch.Generator().manual_seed(4)
    fixed, moving = torch.rand(64, 64, generator=g), torch.rand(3, 64, 64, generator=g, dtype=torch.float64)
    sim = back(moving, fixed, mask=torch.ones(64, 64))
    assert sim.shape == (3,) and sim.dtype == torch.float64 and torch.allclose(sim, model(moving, fixed))
    (tmp_path / "bad.pt").write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match="cannot be read"):
        LearnedSimilarity.load(tmp_path / "bad.pt")
    torch.save({"format": "reg2d3d_ros.ppcl", "version": 1}, tmp_path / "other.pt")
    with pytest.raises(ModelLoadError):
        LearnedSimilarity.load(tmp_path / "other.pt")
    with pytest.raises(ModelLoadError, match="does not exist"):
        LearnedSimilarity.load(tmp_path / "missing.pt")
    with pytest.raises(ConfigError):
        back(torch.rand(64, 64), fixed)


def test_learned_metric_in_intensity_registration(t8):
    reg, case = t8
    cfg = IntensityConfig(metric="learned", levels=(0.5,), iterations=(5,), dof=IN_PLANE_DOF, cmaes=True, cmaes_generations=2)
    saved, reg.learned = reg.learned, None
    try:
        with pytest.raises(ConfigError, match="learned similarity model"):
            reg.register(case.image_att, case.intrinsics, case.T_gt, config=cfg)
        reg.learned = LearnedSimilarity(SimilarityNet(input_size=128, channels=8, coupling_blocks=1, heads=2))
        r = reg.register(case.image_att, case.intrinsics, case.T_gt, config=cfg)
        assert r.iterations <= 5 and r.generations <= 2 and bool(torch.isfinite(r.T_optical_from_ct).all())
        assert r.similarity >= r.start_similarity - 1e-9  # the best pose is kept
        # frozen degrees of freedom stay: depth of the target's centre unchanged
        c = reg.center_ct_mm
        z0 = float((case.T_gt[:3, :3] @ c + case.T_gt[:3, 3])[2])
        z1 = float((r.T_optical_from_ct[:3, :3] @ c + r.T_optical_from_ct[:3, 3])[2])
        assert z1 == pytest.approx(z0, abs=1e-6)
    finally:
        reg.learned = saved


def test_learned_then_gc_stage(t8):
    from reg2d3d_ros.pipeline import intensity_stage

    reg, case = t8
    saved = reg.learned
    reg.learned = LearnedSimilarity(SimilarityNet(input_size=128, channels=8, coupling_blocks=1, heads=2))
    try:
        jump = perturb_about(torch.tensor([0, 0, 0.02, 4.0, -3.0, 0], dtype=torch.float64), reg._center_opt(case.T_gt)) @ case.T_gt
        T, d = intensity_stage(reg, case.image_att, case.intrinsics, jump, "learned_gc", True, 0.5)
        assert d["metric"] == "learned_gc" and "learned_start_similarity" in d and d["similarity"] >= d["start_similarity"] - 1e-9
        assert T.shape == (4, 4) and bool(torch.isfinite(T).all())
        T2, d2 = intensity_stage(reg, case.image_att, case.intrinsics, jump, "gc", True, 0.5)
        assert d2["metric"] == "gc" and "learned_start_similarity" not in d2
    finally:
        reg.learned = saved


def test_pipeline_learned_stage_needs_its_model(tmp_path):
    from reg2d3d_ros.example import example_paths
    from reg2d3d_ros.pipeline import INTENSITY_STAGES, PipelineConfig, RegistrationPipeline, intensity_stage_config

    assert "learned" in INTENSITY_STAGES and "learned_gc" in INTENSITY_STAGES
    ex = example_paths()
    base = dict(ct_path=str(ex.ct), labels_path=str(ex.labels), label_table_path=str(ex.label_table), target="T7")
    with pytest.raises(ModelLoadError, match="similarity.pt"):
        RegistrationPipeline(PipelineConfig(**base, recover="learned")).load()
    with pytest.raises(ModelLoadError, match="similarity.pt"):
        RegistrationPipeline(PipelineConfig(**base, recover="learned_gc")).load()
    (tmp_path / "m").mkdir()
    with pytest.raises(ModelLoadError, match="similarity.pt"):
        RegistrationPipeline(PipelineConfig(**base, refine="learned", models_dir=str(tmp_path / "m"))).load()
    LearnedSimilarity(SimilarityNet(input_size=128, channels=8, coupling_blocks=1, heads=2)).save(tmp_path / "m" / "similarity.pt")
    pipe = RegistrationPipeline(PipelineConfig(**base, recover="learned", models_dir=str(tmp_path / "m")))
    pipe.load()
    assert pipe.intensity.learned is not None and pipe.intensity.learned.input_size == 128
    cfg = intensity_stage_config("learned", True, 1.5, level=0.25)
    assert cfg.metric == "learned" and cfg.levels == (0.25,) and cfg.dof == IN_PLANE_DOF and cfg.cmaes_time_budget_s == 1.5


DDP_SCRIPT = '''
import os, torch
from reg2d3d_ros.similarity.train import SimilarityTrainConfig, train_similarity
g = torch.Generator().manual_seed(0)
def mk(n):
    return {"fixed": torch.rand(32, 32, generator=g), "moving": torch.rand(n, 32, 32, generator=g),
            "jac": torch.randn(n, 6, 32, 32, generator=g).half(), "xi": torch.randn(n, 6, generator=g).double()}
train, val = [mk(8) for _ in range(4)], [mk(4)]
cfg = SimilarityTrainConfig(epochs=1, batch_size=4, input_size=32, channels=8, coupling_blocks=1, heads=2)
m, h = train_similarity(train, val, cfg, progress=False)
out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rank" + os.environ["RANK"] + ".txt")
with open(out, "w") as f:  # one file per rank: lines printed by two processes can interleave
    f.write(" ".join([os.environ["RANK"], os.environ["WORLD_SIZE"], str(len(h)), repr(float(sum(p.double().sum() for p in m.net.parameters())))]))
'''


def test_training_under_torchrun_keeps_the_ranks_in_step(tmp_path):
    """Two processes (gloo, CPU) under PyTorch's DistributedDataParallel: each rank takes half of the
    batches, the gradients (the uncertainty weights included) are averaged, so both end with the same
    network; only rank 0 validates."""
    import os
    import subprocess
    import sys

    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
                         capture_output=True, text=True, timeout=240, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [(tmp_path / f"rank{r}.txt").read_text().split() for r in (0, 1)]
    assert [r[:2] for r in rows] == [["0", "2"], ["1", "2"]]
    assert rows[0][2] == "1" and rows[1][2] == "0"  # history: rank 0 only
    assert rows[0][3] == rows[1][3]  # identical parameters on both ranks


def test_training_command_user_errors(tmp_path, capsys):
    from reg2d3d_ros.similarity.train import main

    assert main(["--vertebrae", "T3", "--out", str(tmp_path)]) == 2  # the last vertebra validates: two needed
    assert main(["--ct", str(tmp_path / "missing.nii.gz"), "--labels", str(tmp_path / "l.nii.gz"), "--out", str(tmp_path)]) == 2
    assert main(["--input-size", "100", "--vertebrae", "T3,T11", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "validates" in err and "missing.nii.gz" in err and "multiple of 8" in err


def test_committed_model_points_towards_the_truth_better_than_gc_and_ncc(t8):
    """The committed model on a test vertebra it never saw (T8, AP): its pose gradient is closer to
    the direction of the true pose than gradient correlation's and NCC's (all six parameters and the
    in-plane ones)."""
    from pathlib import Path

    from reg2d3d_ros.intensity import gradient_correlation, ncc
    from reg2d3d_ros.similarity.train import baseline_angles

    reg, case = t8
    model = LearnedSimilarity.load(Path(__file__).resolve().parents[1] / "models" / "similarity" / "similarity.pt")
    samples = [similarity_samples(reg, case.image_att, case.intrinsics, case.T_gt, 24, seed=99)]
    learned = {}
    for dims in (None, IN_PLANE):
        learned[dims] = baseline_angles(samples, lambda m, f: model(m.float(), f.float()).double(), dims=dims)
        for fn in (gradient_correlation, ncc):
            other = baseline_angles(samples, fn, dims=dims)
            assert learned[dims].mean() < other.mean() - 5.0, (dims, fn.__name__, learned[dims].mean(), other.mean())
    assert np.mean(learned[None] < 90.0) > 0.75  # descending it mostly approaches the truth
