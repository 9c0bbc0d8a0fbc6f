"""SCR-PnP initialisation: loss, PnP with outliers, conventions end to end, model files, tiny training run."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from reg2d3d_ros.errors import ModelLoadError
from reg2d3d_ros.geometry import CArmIntrinsics, carm_pose, project_points
from reg2d3d_ros.scr.loss import scr_loss
from reg2d3d_ros.scr.pnp import select_correspondences, solve_pnp

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def _pred(mean, log_sigma):
    """(B, 8, h, w) from entry/exit means (B, 2, 3, h, w) and log sigmas (B, 2, h, w)."""
    B, _, _, h, w = mean.shape
    return torch.cat([mean, log_sigma[:, :, None]], dim=2).reshape(B, 8, h, w)


def test_loss_is_the_gaussian_nll_on_hits_and_pushes_sigma_up_elsewhere():
    torch.manual_seed(0)
    X = torch.randn(2, 6, 8, 8)
    hit = torch.zeros(2, 1, 8, 8)
    hit[:, :, :4] = 1.0
    d = 0.3  # every hit coordinate is off by d along x
    mean = X.reshape(2, 2, 3, 8, 8).clone()
    mean[:, :, 0] += d
    # the NLL 0.5 d^2 / sigma^2 + 3 log sigma is smallest at sigma^2 = d^2 / 3
    s_opt = 0.5 * np.log(d * d / 3)
    losses = {}
    for s in (s_opt - 0.5, s_opt, s_opt + 0.5):
        out = scr_loss(_pred(mean, torch.full((2, 2, 8, 8), s)), X, hit)
        losses[s] = float(out["nll"])
        assert abs(float(out["err"]) - d) < 1e-5
    assert losses[s_opt] < losses[s_opt - 0.5] and losses[s_opt] < losses[s_opt + 0.5]
    assert losses[s_opt] == pytest.approx(0.5 * 3 + 3 * s_opt, abs=1e-5)
    # pixels without bone: loss 1/sigma, falling as sigma grows; their mean does not enter the NLL
    lo = scr_loss(_pred(mean, torch.full((2, 2, 8, 8), 0.0)), X, hit)
    hi = scr_loss(_pred(mean, torch.full((2, 2, 8, 8), 2.0)), X, hit)
    assert float(hi["nonhit"]) < float(lo["nonhit"])
    wild = mean.clone()
    wild[..., 4:, :] += 100.0  # garbage where there is no bone
    assert float(scr_loss(_pred(wild, torch.zeros(2, 2, 8, 8)), X, hit)["nll"]) == pytest.approx(float(lo["nll"]))
    # gradients flow
    p = _pred(mean, torch.zeros(2, 2, 8, 8)).requires_grad_(True)
    scr_loss(p, X, hit)["loss"].backward()
    assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


@pytest.mark.parametrize("outlier_fraction", [0.0, 0.4, 0.6])
def test_ransac_pnp_recovers_the_pose_from_scene_coordinates_with_outliers(outlier_fraction):
    rng = np.random.default_rng(1)
    intr = CArmIntrinsics.from_detector(1020.0, 1.2, 256, 256)
    K = intr.K(torch.float64)
    center = np.array([10.0, -20.0, -150.0])
    T = carm_pose(center, 680.0, lao_deg=25.0, cran_deg=-8.0)
    # a vertebra-sized cloud of scene coordinates (entry/exit points of a 60 mm structure)
    pts = center + rng.uniform(-30, 30, size=(500, 3))
    uv, _ = project_points(K, T, torch.from_numpy(pts))
    uv = uv.numpy() + rng.normal(0, 0.5, size=(500, 2))
    n_out = int(outlier_fraction * len(pts))
    bad = rng.choice(len(pts), n_out, replace=False)
    pts_noisy = pts.copy()
    pts_noisy[bad] += rng.normal(0, 40.0, size=(n_out, 3))  # wrong scene coordinates
    res = solve_pnp(pts_noisy, uv, K.numpy(), reprojection_px=3.0, seed=0)
    assert res.T_optical_from_ct is not None
    from reg2d3d_ros.eval import mtre

    err = float(mtre(res.T_optical_from_ct, T, torch.from_numpy(pts)))
    assert err < 1.5, err
    assert res.inlier_fraction == pytest.approx(1 - outlier_fraction, abs=0.08)
    assert res.reprojection_px < 1.5


def test_pnp_fails_cleanly_without_enough_points():
    res = solve_pnp(np.zeros((3, 3)), np.zeros((3, 2)), np.eye(3))
    assert res.T_optical_from_ct is None and res.n_inliers == 0


def test_selection_keeps_confident_points_spread_and_bounded():
    h = w = 32
    mean = torch.randn(2, h, w, 3)
    s = torch.full((2, h, w), 1.0)
    s[0, 4:28, 4:28] = -4.0  # confident block (entry)
    s[1, 10:20, 10:20] = -5.0  # more confident (exit)
    uv = torch.stack(torch.meshgrid(torch.arange(w, dtype=torch.float64), torch.arange(h, dtype=torch.float64), indexing="xy"), -1)
    pts, uvs, ls = select_correspondences(mean, s, uv, max_log_sigma=-3.0, max_points=200)
    assert len(pts) == 200 and (ls < -3.0).all()
    # spread: the kept pixels cover most of the confident block, not just the most confident corner
    assert np.ptp(uvs[:, 0]) > 18 and np.ptp(uvs[:, 1]) > 18
    few, _, _ = select_correspondences(mean, s, uv, max_log_sigma=-4.5, max_points=1000)
    assert len(few) == 100


@pytest.fixture(scope="module")
def rendered_views():
    """Two views of the example CT at 64x64 with ground-truth scene coordinates."""
    from reg2d3d_ros.example import load_example
    from reg2d3d_ros.scr.data import ViewDistribution, render_views, scr_renderer
    from reg2d3d_ros.sim import structure_center

    ct = load_example()
    c = structure_center(ct, "T8")
    poses = ViewDistribution().sample(c, 2, seed=3)
    K = CArmIntrinsics.from_detector(1020.0, 307.2 / 64, 64, 64).K(torch.float64)
    return {"views": render_views(scr_renderer(ct, step_mm=2.0), K, 64, poses), "poses": poses, "center": c,
            "pts": torch.from_numpy(ct.label_points_ct_mm([ct.label_names["vertebrae_T8"]], max_points=500))}


def test_oracle_scene_coordinates_give_the_true_pose_through_the_initialiser(rendered_views):
    """Pixel mapping, normalisation, selection and PnP agree with the renderer's conventions."""
    from reg2d3d_ros.eval import mtre
    from reg2d3d_ros.nets import UNet
    from reg2d3d_ros.scr.data import SceneNormalisation
    from reg2d3d_ros.scr.model import SCRInitializer

    v = rendered_views["views"]
    norm = SceneNormalisation(tuple(rendered_views["center"]), 100.0)
    meta = {"size": 64, "stride": 2, "widths": [8, 16], "center_ct_mm": list(norm.center_ct_mm), "scale_mm": 100.0}
    for i in range(2):
        # an oracle network: the true coordinates at the output pixels, confident where bone is hit
        e = norm.normalise(torch.from_numpy(v["entry_ct_mm"][i]))[1::2, 1::2]
        x = norm.normalise(torch.from_numpy(v["exit_ct_mm"][i]))[1::2, 1::2]
        hit = torch.from_numpy(v["hit"][i])[1::2, 1::2]
        s = torch.where(hit, -5.0, 3.0)
        out = torch.cat([e.permute(2, 0, 1), s[None], x.permute(2, 0, 1), s[None]])[None].float().numpy()
        model = SCRInitializer(UNet(1, 8, widths=(8, 16)), meta, runner=lambda _x, out=out: out)
        # the frame is twice the network's size: the output pixels map back by the pixel-centre convention
        frame = np.kron(v["line_integral"][i], np.ones((2, 2), np.float32))
        K = CArmIntrinsics.from_detector(1020.0, 307.2 / 128, 128, 128).K(torch.float64).numpy()
        r = model.initialise(frame, K)
        assert r.accepted, r.why
        err = float(mtre(r.T_optical_from_ct, rendered_views["poses"][i], rendered_views["pts"]))
        assert err < 1.0, err


def test_model_file_round_trip_and_bad_files(tmp_path):
    from reg2d3d_ros.nets import UNet
    from reg2d3d_ros.scr.model import SCRInitializer

    meta = {"size": 64, "stride": 2, "widths": [8, 16, 24], "center_ct_mm": [1.0, 2.0, 3.0], "scale_mm": 100.0}
    m = SCRInitializer(UNet(1, 8, widths=(8, 16, 24)), meta)
    m.save(tmp_path / "scr.pt")
    m2 = SCRInitializer.load(tmp_path / "scr.pt")
    frame = np.random.default_rng(0).random((128, 128)).astype(np.float32)
    assert torch.allclose(m.predict(frame), m2.predict(frame), atol=1e-6)
    (tmp_path / "bad.pt").write_bytes(b"not a model at all")
    with pytest.raises(ModelLoadError, match="cannot be read"):
        SCRInitializer.load(tmp_path / "bad.pt")
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(ModelLoadError, match="not an SCR model"):
        SCRInitializer.load(tmp_path / "other.pt")
    with pytest.raises(ModelLoadError, match="does not exist"):
        SCRInitializer.load(tmp_path / "missing.pt")
    blob = torch.load(tmp_path / "scr.pt", weights_only=True)
    blob["meta_json"] = json.dumps({**meta, "widths": [8, 16]})
    torch.save(blob, tmp_path / "mismatch.pt")
    with pytest.raises(ModelLoadError, match="does not match"):
        SCRInitializer.load(tmp_path / "mismatch.pt")


def test_tiny_prepare_trains_exports_and_the_pipeline_uses_it(tmp_path):
    """The preparation command end to end on a few views; the pipeline initialises with the model."""
    from reg2d3d_ros.engines import load, onnx_path_for
    from reg2d3d_ros.engines.runtime import onnx_source_sha256, file_sha256
    from reg2d3d_ros.example import example_paths
    from reg2d3d_ros.pipeline import PipelineConfig, RegistrationPipeline
    from reg2d3d_ros.scr.model import SCRInitializer

    ex = example_paths()
    out = tmp_path / "models"
    # no --label-table: TotalSegmentator's names are built in (the example's map is v2)
    cmd = [sys.executable, "-m", "reg2d3d_ros.prepare", "--ct", str(ex.ct), "--labels", str(ex.labels),
           "--target", "T8", "--out", str(out), "--quality", "tiny", "--size", "64", "--epochs", "3", "--quiet"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    meta = json.loads((out / "scr.json").read_text())
    assert meta["label_names"].startswith("TotalSegmentator v2 names")
    hist = meta["training"]["history"]
    assert len(hist) == 3 and hist[-1]["train_loss"] < hist[0]["train_loss"]
    # resumable: a second run finds the views and the finished checkpoint and does not train again
    res2 = subprocess.run(cmd[:-1], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res2.returncode == 0 and "resuming" in res2.stderr and "rendering views [" not in res2.stderr
    # issue 19: what it was made from, in everything it wrote; the training time of both runs
    meta2 = json.loads((out / "scr.json").read_text())
    prov = meta2["provenance"]
    assert prov["ct"]["sha256"] == file_sha256(ex.ct) and prov["labels"]["sha256"] == file_sha256(ex.labels)
    assert prov["target"] == {"asked": "T8", "name": "vertebrae_T8", "id": 36}
    assert prov["geometry"] == {"sdd_mm": 1020.0, "detector_mm": 307.2, "size": 64}
    assert SCRInitializer.load(out / "scr.pt").meta["provenance"] == prov
    with np.load(out / "surface_T8.npz", allow_pickle=False) as z:
        assert json.loads(str(z["provenance_json"])) == prov
    runs = meta2["training"]["runs"]
    assert len(runs) == 2 and meta2["training"]["seconds"] == round(sum(r["seconds"] for r in runs)) >= meta["training"]["seconds"]
    assert len(json.loads((out / "cache" / "runs.json").read_text())) == 2
    # a folder made for T8 is not continued for another target; the node's pipeline refuses it for another one
    res3 = subprocess.run(cmd[:8] + ["T9"] + cmd[9:], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res3.returncode == 2 and "Traceback" not in res3.stderr, res3.stderr
    assert f"{out} holds a model folder made for target T8 (vertebrae_T8, id 36), not T9 (vertebrae_T9, id 35)" in res3.stderr
    with pytest.raises(ModelLoadError, match="was made for target T8 .*not T9"):
        RegistrationPipeline(PipelineConfig(ct_path=str(ex.ct), labels_path=str(ex.labels), target="T9", models_dir=str(out))).load()
    # ONNX Runtime and PyTorch agree
    m = SCRInitializer.load(out / "scr.pt")
    frame = np.random.default_rng(0).random((128, 128)).astype(np.float32)
    engine = load(out / "scr.pt", "scr", "onnxruntime", "cpu")
    assert engine.backend == "onnxruntime" and onnx_source_sha256(onnx_path_for(out / "scr.pt", "scr", 1)) == file_sha256(out / "scr.pt")
    onnx_out = engine(m.network_input(frame).numpy())
    assert np.allclose(onnx_out[0], m.predict(frame).numpy(), atol=1e-4)
    # the pipeline loads it and runs SCR on a frame without an initial pose
    p = RegistrationPipeline(PipelineConfig(ct_path=str(ex.ct), labels_path=str(ex.labels), label_table_path=str(ex.label_table), target="T8",
                                            models_dir=str(out), backend="onnxruntime"))
    p.load()
    assert p.scr is not None and p.scr.runner is not None
    p.set_camera_info(CArmIntrinsics.from_detector(1020.0, 2.4, 128, 128).K(torch.float64).numpy().ravel().tolist(), 128, 128)
    img = (frame * 1000).astype(np.float32)
    r = p.process("32FC1", 128, 128, 128 * 4, img.tobytes())
    assert "scr_inliers" in r.details and "scr_ms" in r.details
    # a frame of noise publishes nothing: the 3-epoch model's pose is rejected by SCR's acceptance
    # test or, if SCR lets it through, PPC's result by the pipeline's (gradient correlation)
    assert r.T_optical_from_ct is None, r.details
    assert (r.error.startswith("SCR:") and r.state == "initialising") or r.error.startswith("initialisation rejected"), r.error


def test_prepare_reports_user_errors_without_traceback(tmp_path):
    res = subprocess.run([sys.executable, "-m", "reg2d3d_ros.prepare", "--ct", str(tmp_path / "nope.nii.gz"), "--labels", str(tmp_path / "l.nii.gz"),
                          "--out", str(tmp_path / "o"), "--quiet"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "error:" in res.stderr and "Traceback" not in res.stderr


def test_prepare_names_label_problems_and_leaves_no_empty_folders(tmp_path):
    """Issue 19: an empty target, a label map on another grid, a CT that is no volume: exit 2, one message, no empty OUT/cache."""
    import SimpleITK as sitk

    from reg2d3d_ros.example import example_paths

    def prepare(*args):
        return subprocess.run([sys.executable, "-m", "reg2d3d_ros.prepare", *map(str, args), "--quality", "tiny", "--quiet"],
                              cwd=REPO, capture_output=True, text=True, timeout=300)

    ex = example_paths()
    out = tmp_path / "models"
    res = prepare("--ct", ex.ct, "--labels", ex.labels, "--target", "C1", "--out", out)  # the example stops at C5
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert f"structure 'C1' (vertebrae_C1, id 50) has no voxels in {ex.labels}" in res.stderr and "its vertebrae: C5" in res.stderr
    assert not out.exists()  # neither OUT nor OUT/cache is left behind
    ct = sitk.GetImageFromArray(np.zeros((12, 101, 122), np.int16))
    labels = sitk.GetImageFromArray(np.zeros((12, 101, 132), np.uint8))
    sitk.WriteImage(ct, str(tmp_path / "ct.nii.gz"))
    sitk.WriteImage(labels, str(tmp_path / "labels.nii.gz"))
    out.mkdir()  # an existing (empty) folder stays; the cache this run would make does not
    res = prepare("--ct", tmp_path / "ct.nii.gz", "--labels", tmp_path / "labels.nii.gz", "--target", "L3", "--out", out)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "is not on the grid of the CT" in res.stderr and "label map 132x101x12 voxels" in res.stderr and "CT 122x101x12" in res.stderr
    assert "--resample-labels" in res.stderr
    assert out.is_dir() and not any(out.iterdir())
    (tmp_path / "text.nii.gz").write_text("not a volume")
    res = prepare("--ct", tmp_path / "text.nii.gz", "--labels", tmp_path / "labels.nii.gz", "--out", tmp_path / "o2")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "cannot read CT" in res.stderr and "file format was not recognised" in res.stderr
    assert ".cxx" not in res.stderr and "sitk::" not in res.stderr and not (tmp_path / "o2").exists()


def test_clinical_views_are_ap_or_lateral_around_the_given_centres():
    from reg2d3d_ros.scr.data import CLINICAL_VIEWS, ViewDistribution

    centres = np.array([[0.0, 0.0, -100.0], [0.0, 0.0, 100.0]])
    T = CLINICAL_VIEWS.sample(centres, 400, seed=5).numpy()
    beam_ct = T[:, 2, :3]  # optical z (the beam) in CT coordinates
    lateral = np.abs(beam_ct[:, 0]) > np.abs(beam_ct[:, 1])  # LPS: a lateral beam runs along x, an AP one along y
    assert 0.2 < lateral.mean() < 0.4
    # the isocentre (on the beam, SID from the source) lies near one of the two centres, both used
    src_ct = -np.einsum("nij,ni->nj", T[:, :3, :3], T[:, :3, 3])
    iso = src_ct + beam_ct * 680.0
    near = np.argmin(np.abs(iso[:, 2:3] - centres[None, :, 2]), axis=1)
    assert 0.35 < near.mean() < 0.65
    # the old distribution is unchanged by the new fields (same draws for the same seed)
    assert torch.equal(ViewDistribution().sample(centres[0], 3, seed=1), ViewDistribution(lateral_fraction=0.0).sample(centres[0], 3, seed=1))


def test_randomised_views_cache_memory_map_and_train_samples(tmp_path):
    """Components are cached once; each epoch draws new physics for the same geometry; the time budget stops and resume continues."""
    from reg2d3d_ros.example import load_example
    from reg2d3d_ros.scr.data import CLINICAL_VIEWS, DatasetSpec, SCRDataset, SceneNormalisation, build_view_cache, load_views, open_views
    from reg2d3d_ros.scr.train import TrainConfig, train_scr
    from reg2d3d_ros.sim import structure_center

    ct = load_example()
    c = tuple(float(v) for v in structure_center(ct, "T8"))
    spec = DatasetSpec(target="T8", center_ct_mm=c, size=32, n_views=6, seed=2, sdd_mm=1020.0, pixel_spacing_mm=307.2 / 32,
                       views=CLINICAL_VIEWS, step_mm=4.0, physics="randomised", view_centers_ct_mm=(c,))
    files = build_view_cache(ct, spec, tmp_path / "views", chunk=4, progress=False)
    v = open_views(tmp_path / "views", files)
    ref = load_views(files)
    assert set(v) == {"poses", "components", "entry_ct_mm", "exit_ct_mm", "hit"} and isinstance(v["components"], np.memmap)
    assert all(np.array_equal(v[k], ref[k]) for k in v) and v["components"].shape == (6, 2, 32, 32)
    assert float(v["components"][:, 1].max()) > 0  # bone
    ds = SCRDataset(v, SceneNormalisation(c), seed=0, intrinsics=spec.intrinsics())
    a = ds[0]
    ds.epoch = 1
    b = ds[0]
    assert torch.isfinite(a["image"]).all() and not torch.allclose(a["image"], b["image"])  # a new draw
    assert torch.equal(a["coords"], b["coords"]) and float(a["hit"].mean()) > 0
    with pytest.raises(Exception, match="intrinsics"):
        SCRDataset(v, SceneNormalisation(c))
    cfg = TrainConfig(epochs=3, batch_size=2, widths=(8, 16), time_budget_s=1e-3, validation_fraction=0.2)
    ck = tmp_path / "ck.pt"
    _, h1 = train_scr(v, SceneNormalisation(c), cfg, ck, progress=False, intrinsics=spec.intrinsics())
    assert len(h1) == 1  # the first epoch of a run always runs, then the budget stops it
    _, h2 = train_scr(v, SceneNormalisation(c), cfg, ck, progress=False, intrinsics=spec.intrinsics())
    assert [h["epoch"] for h in h2] == [1, 2]  # resumed from the checkpoint
