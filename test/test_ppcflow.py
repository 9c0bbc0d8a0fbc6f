"""PPC Flow (Attention): correlation layer, flow sampling, the known-operator update, training, model file."""

from pathlib import Path

import numpy as np
import pytest
import torch

from reg2d3d_ros.errors import ConfigError, ModelLoadError
from reg2d3d_ros.nets import CorrespondenceWeightNet
from reg2d3d_ros.nets.flownet import FlowNetC, correlation, sample_flow
from reg2d3d_ros.ppcflow import N_FEATURES, FlowOperator
from reg2d3d_ros.ppcflow.train import FlowTrainConfig, forward_update, train_flow

REPO = Path(__file__).resolve().parents[1]


def test_correlation_peaks_at_the_shift():
    torch.manual_seed(0)
    f1 = torch.randn(1, 8, 20, 20)
    f2 = torch.roll(f1, shifts=(2, -3), dims=(2, 3))  # f2(x + (dy=2, dx=-3)) = f1(x)
    cost = correlation(f1, f2, 4)[0, :, 6:14, 6:14].mean(dim=(1, 2))  # away from the borders
    k = int(torch.argmax(cost))
    dy, dx = k // 9 - 4, k % 9 - 4
    assert (dy, dx) == (2, -3)


def test_sample_flow_is_bilinear():
    H, W = 16, 20
    v, u = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    flow = torch.stack([2 * u + 1, -v])[None]  # linear fields are reproduced exactly
    uv = torch.tensor([[[3.25, 4.5], [10.0, 0.0], [18.9, 14.1]]])
    out = sample_flow(flow, uv)
    assert torch.allclose(out[0, :, 0], 2 * uv[0, :, 0] + 1, atol=1e-4)
    assert torch.allclose(out[0, :, 1], -uv[0, :, 1], atol=1e-4)


def test_flownet_shapes_and_scale():
    net = FlowNetC(width=16, max_displacement=2)
    f = torch.randn(2, 2, 32, 48)
    out = net(f, f)
    assert out.shape == (2, 2, 32, 48) and bool(torch.isfinite(out).all())


def _synthetic_flow_sample(rng, size=32, shift_mm=(2.0, -1.5, 0.0)):
    """Contour points in front of the source; the truth is a pure translation (T_start = identity)."""
    K = torch.tensor([[60.0, 0.0, size / 2], [0.0, 60.0, size / 2], [0.0, 0.0, 1.0]], dtype=torch.float64)
    n = 80
    w = torch.from_numpy(np.array([0.0, 0.0, 700.0]) + rng.normal(size=(n, 3)) * [40.0, 40.0, 10.0])
    r = w / w.norm(dim=-1, keepdim=True)
    g = torch.from_numpy(rng.normal(size=(n, 3)))
    g = g - (g * r).sum(-1, keepdim=True) * r
    g = g / g.norm(dim=-1, keepdim=True)
    q = w @ K.T
    uv = q[:, :2] / q[:, 2:]
    normal = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(n, 2))), dim=-1)
    T_gt = torch.eye(4, dtype=torch.float64)
    T_gt[:3, 3] = torch.tensor(shift_mm, dtype=torch.float64)
    img = torch.from_numpy(rng.normal(size=(2, size, size))).to(torch.float16)
    return {"fixed": img, "moving": img, "w_opt": w, "g_opt": g, "uv": uv, "normal": normal, "K": K, "search_px": torch.tensor(4.0),
            "T_start": torch.eye(4, dtype=torch.float64), "T_gt": T_gt, "target_pts": w[:30].clone(), "group": "synthetic"}


class _ConstantFlow(torch.nn.Module):
    """A stand-in flow network that returns a fixed displacement everywhere."""

    def __init__(self, du, dv):
        super().__init__()
        self.d = torch.tensor([du, dv], dtype=torch.float32)

    def forward(self, fixed, moving):
        return self.d[None, :, None, None].expand(fixed.shape[0], 2, *fixed.shape[-2:])


def test_known_operator_update_with_the_true_flow_recovers_the_translation():
    """With the flow of the true motion, the PPC solve inside the update brings mTRE near zero."""
    s = _synthetic_flow_sample(np.random.default_rng(0))
    fx, z = 60.0, 700.0
    du, dv = fx * 2.0 / z, fx * -1.5 / z  # image shift of the translation at the points' depth
    r = forward_update(_ConstantFlow(du, dv), None, [s], n_points=128)
    assert float(r["mtre_before_mm"]) == pytest.approx(2.5, abs=1e-6)
    assert float(r["mtre_mm"]) < 0.25
    assert float(r["epe_px"]) < 0.02  # the constant flow is (almost) the true one: points at nearly one depth
    wrong = forward_update(_ConstantFlow(-du, -dv), None, [s], n_points=128)
    assert float(wrong["mtre_mm"]) > 4.0 and float(wrong["epe_px"]) > 0.3


def test_training_runs_resumes_and_keeps_the_best_epoch(tmp_path):
    rng = np.random.default_rng(1)
    train = [_synthetic_flow_sample(rng) for _ in range(6)]
    val = [_synthetic_flow_sample(rng) for _ in range(3)]
    ck = tmp_path / "f.ckpt"
    cfg = FlowTrainConfig(kind="ppc_flow_attention", epochs=2, batch=3, n_points=64, width=8, max_displacement=2)
    op, h1 = train_flow(train, val, cfg, checkpoint=ck, progress=False)
    op2, h2 = train_flow(train, val, FlowTrainConfig(**{**cfg.__dict__, "epochs": 3}), checkpoint=ck, progress=False)
    assert len(h1) == 2 and len(h2) == 3 and h2[:2] == h1
    best = min(range(3), key=lambda i: h2[i]["val_mtre_mm"])
    assert op2.meta["best_epoch"] == best and op2.attention_net is not None
    with pytest.raises(ConfigError, match="kind must be one of"):
        train_flow(train, val, FlowTrainConfig(kind="magic"), progress=False)


def test_model_file_round_trip_and_clear_errors(tmp_path):
    torch.manual_seed(0)
    op = FlowOperator(FlowNetC(8, 2), CorrespondenceWeightNet(N_FEATURES), {"kind": "ppc_flow_attention", "width": 8, "max_displacement": 2,
                                                                             "local": [32, 64], "head": [64, 32]})
    op.save(tmp_path / "ppcflow.pt")
    back = FlowOperator.load(tmp_path / "ppcflow.pt")
    g = torch.randn(2, 24, 28)
    assert torch.allclose(back.flow(g, g), op.flow(g, g), atol=1e-6)  # 24x28 is padded to multiples of 4 and cropped back
    assert back.flow(g, g).shape == (1, 2, 24, 28)
    with pytest.raises(ModelLoadError, match="does not exist"):
        FlowOperator.load(tmp_path / "none.pt")
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="cannot be read"):
        FlowOperator.load(tmp_path / "bad.pt")
    from reg2d3d_ros.ppc import PPCConfig

    with pytest.raises(ConfigError, match="both"):
        PPCConfig(learned_levels=(0.25,), flow_levels=(0.25,))
