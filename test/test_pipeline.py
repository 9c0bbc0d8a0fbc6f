"""The node's pipeline without ROS: states, frame checks, initial pose, tracking, lost, reset."""

import numpy as np
import pytest
import torch

from reg2d3d_ros.errors import ConfigError, CTLoadError
from reg2d3d_ros.images import encode_image
from reg2d3d_ros.pipeline import INITIALISING, LOST, TRACKING, WAITING_FOR_CT, PipelineConfig, RegistrationPipeline


@pytest.fixture(scope="module")
def setting():
    from reg2d3d_ros.eval import mrpd
    from reg2d3d_ros.eval.cases import CaseSet, make_cases
    from reg2d3d_ros.example import example_paths, load_example
    from reg2d3d_ros.sim import CArmSetup, XrayDegradation, make_trajectory, simulate_sequence, structure_center, xray_renderer

    ct = load_example()
    setup = CArmSetup()
    T0 = make_cases(ct, CaseSet("t", ("T7",), views=("lateral",), seed=1001), 1)[0].T_gt
    poses = make_trajectory("smooth", T0, 4, structure_center(ct, "T7"), setup, seed=3)
    seq = simulate_sequence(xray_renderer(ct), setup.intrinsics(), poses, XrayDegradation(), seed=3)
    ex = example_paths()
    cfg = PipelineConfig(ct_path=str(ex.ct), labels_path=str(ex.labels), label_table_path=str(ex.label_table), target="T7")
    pipe = RegistrationPipeline(cfg)
    pipe.load()
    pts = torch.from_numpy(ct.label_points_ct_mm([37], max_points=500))
    return {"pipe": pipe, "seq": seq, "pts": pts, "mrpd": mrpd, "cfg": cfg, "poses": poses}


def frame(seq, i, encoding=None):
    f = encode_image(seq.images[i], encoding or seq.encoding)
    return f["encoding"], f["height"], f["width"], f["step"], f["data"]


def test_configuration_and_load_errors(tmp_path):
    with pytest.raises(ConfigError):
        RegistrationPipeline(PipelineConfig(intensity="bright"))
    with pytest.raises(ConfigError):
        RegistrationPipeline(PipelineConfig(tracker="magic"))
    with pytest.raises(ConfigError, match="search_range_mm must be a number in"):
        RegistrationPipeline(PipelineConfig(search_range_mm=-5.0))
    from reg2d3d_ros.pipeline import ppc_configs

    assert ppc_configs(PipelineConfig())[0].polish_levels and not ppc_configs(PipelineConfig(polish=False))[0].polish_levels
    guarded, track = ppc_configs(PipelineConfig())
    assert guarded.guard and guarded.search_select == "gc" and not track.guard  # the tracking update is not guarded
    assert not ppc_configs(PipelineConfig(guard=False))[0].guard
    with pytest.raises(ConfigError, match="ct_path"):
        RegistrationPipeline(PipelineConfig()).load()
    with pytest.raises(CTLoadError, match="does not exist"):
        RegistrationPipeline(PipelineConfig(ct_path=str(tmp_path / "x.nii.gz"), labels_path=str(tmp_path / "y.nii.gz"))).load()
    p = RegistrationPipeline(PipelineConfig())
    p.fail_load("cannot read CT")
    res = p.process(*frame_dummy())
    assert res.T_optical_from_ct is None and res.state == WAITING_FOR_CT and "cannot read CT" in res.error


def test_learned_trackers_need_their_model(tmp_path, setting):
    from reg2d3d_ros.errors import ModelLoadError
    from reg2d3d_ros.pipeline import TRACKERS, tracker_configs

    assert TRACKERS == ("ppc", "ppc_l", "ppc_l_plus", "ppc_l_hybrid", "ppc_flow_plus")
    reg_cfg, track_cfg = tracker_configs("ppc_flow_plus")
    assert reg_cfg.flow_levels == (0.25,) and track_cfg.flow_levels == () and track_cfg.learned_levels == ()
    reg_cfg, track_cfg = tracker_configs("ppc_l_plus")
    assert reg_cfg.learned_levels == (0.25, 0.5) and track_cfg.learned_levels == ()  # classic at full resolution
    reg_cfg, track_cfg = tracker_configs("ppc_l")
    assert 1.0 in reg_cfg.learned_levels and track_cfg.learned_levels == (1.0,)
    base = setting["cfg"]
    from dataclasses import replace

    with pytest.raises(ModelLoadError, match="models_dir is not set"):
        RegistrationPipeline(replace(base, tracker="ppc_l")).load()
    with pytest.raises(ModelLoadError, match="ppcl.pt does not exist"):
        RegistrationPipeline(replace(base, tracker="ppc_l_plus", models_dir=str(tmp_path))).load()
    with pytest.raises(ModelLoadError, match="ppcflow.pt does not exist"):
        RegistrationPipeline(replace(base, tracker="ppc_flow_plus", models_dir=str(tmp_path))).load()
    from pathlib import Path

    models = Path(__file__).resolve().parents[1] / "models" / "ppcl"  # coarse levels only
    with pytest.raises(ModelLoadError, match=r"needs PPC-L networks for the levels \[1.0\]"):
        RegistrationPipeline(replace(base, tracker="ppc_l", models_dir=str(models))).load()
    (tmp_path / "ppcl.pt").write_bytes(b"\x00garbage")
    with pytest.raises(ModelLoadError):
        RegistrationPipeline(replace(base, tracker="ppc_l_plus", models_dir=str(tmp_path))).load()


def test_ppcl_hybrid_tracker_registers_and_tracks_through_the_pipeline(setting):
    """The committed PPC-L model runs inside the node's pipeline (registration + tracking) and keeps the truth."""
    from dataclasses import replace
    from pathlib import Path

    models = Path(__file__).resolve().parents[1] / "models" / "ppcl"
    pipe = RegistrationPipeline(replace(setting["cfg"], tracker="ppc_l_hybrid", models_dir=str(models)))
    pipe.load()
    assert pipe.registrator.learned is not None and pipe.register_config.learned_as_prior
    seq, pts, mrpd = setting["seq"], setting["pts"], setting["mrpd"]
    ci = seq.intrinsics.to_camera_info()
    pipe.set_camera_info(ci["k"], ci["width"], ci["height"])
    pipe.set_initial_pose(torch.from_numpy(seq.poses_mm[0]))
    res = pipe.process(*frame(seq, 0))
    assert res.T_optical_from_ct is not None and res.details["mode"] == "initialise (initial_pose)", res.error
    assert float(mrpd(res.T_optical_from_ct, torch.from_numpy(seq.poses_mm[0]), pts)) < 2.0
    res = pipe.process(*frame(seq, 1))
    assert res.details["mode"] == "track" and float(mrpd(res.T_optical_from_ct, torch.from_numpy(seq.poses_mm[1]), pts)) < 2.0


def test_flow_tracker_runs_its_operator_in_the_pipeline(setting, tmp_path):
    """Plumbing of ppc_flow_plus: the flow model is loaded and its operator runs at the coarsest level.

    No accuracy is asserted: no flow model trained here is good enough (reports/ppcl/report.md).
    """
    from dataclasses import replace

    from reg2d3d_ros.nets import CorrespondenceWeightNet
    from reg2d3d_ros.nets.flownet import FlowNetC
    from reg2d3d_ros.ppcflow import N_FEATURES, FlowOperator

    torch.manual_seed(0)
    FlowOperator(FlowNetC(8, 2), CorrespondenceWeightNet(N_FEATURES),
                 {"kind": "ppc_flow_attention", "width": 8, "max_displacement": 2, "local": [32, 64], "head": [64, 32]}).save(tmp_path / "ppcflow.pt")
    pipe = RegistrationPipeline(replace(setting["cfg"], tracker="ppc_flow_plus", models_dir=str(tmp_path)))
    pipe.load()
    calls = []
    flow = pipe.registrator.flow
    original = flow.flow

    def counting(*a):
        calls.append(1)
        return original(*a)

    flow.flow = counting
    seq = setting["seq"]
    ci = seq.intrinsics.to_camera_info()
    pipe.set_camera_info(ci["k"], ci["width"], ci["height"])
    pipe.set_initial_pose(torch.from_numpy(seq.poses_mm[0]))
    res = pipe.process(*frame(seq, 0))
    assert res.details.get("mode") == "initialise (initial_pose)" and len(calls) >= 1
    n = len(calls)
    pipe.process(*frame(seq, 1))
    assert len(calls) == n  # tracking is classic (the flow operator serves registration only)


def frame_dummy():
    f = encode_image(np.arange(64, dtype=np.uint16).reshape(8, 8), "mono16")
    return f["encoding"], f["height"], f["width"], f["step"], f["data"]


def test_states_initial_pose_tracking_lost_and_reset(setting):
    pipe, seq, pts, mrpd = setting["pipe"], setting["seq"], setting["pts"], setting["mrpd"]
    pipe.reset()
    assert pipe.state == INITIALISING
    res = pipe.process(*frame(seq, 0))
    assert res.T_optical_from_ct is None and "camera_info" in res.error  # no camera info yet
    ci = seq.intrinsics.to_camera_info()
    pipe.set_camera_info(ci["k"], ci["width"], ci["height"] + 1)
    res = pipe.process(*frame(seq, 0))
    assert res.T_optical_from_ct is None and "camera_info says" in res.error  # size mismatch
    pipe.set_camera_info(ci["k"], ci["width"], ci["height"])
    res = pipe.process(*frame(seq, 0))
    assert res.T_optical_from_ct is None and res.state == INITIALISING and "initial pose" in res.error
    pipe.set_initial_pose(torch.from_numpy(seq.poses_mm[0]))
    res = pipe.process(*frame(seq, 0))
    assert res.T_optical_from_ct is not None and res.state == TRACKING and res.details["mode"] == "initialise (initial_pose)"
    assert float(mrpd(res.T_optical_from_ct, torch.from_numpy(seq.poses_mm[0]), pts)) < 2.0
    res = pipe.process(*frame(seq, 1))
    assert res.details["mode"] == "track" and float(mrpd(res.T_optical_from_ct, torch.from_numpy(seq.poses_mm[1]), pts)) < 2.0
    # a bad frame changes nothing
    h, w = seq.intrinsics.height, seq.intrinsics.width
    res = pipe.process("rgb8", h, w, 3 * w, bytes(3 * w * h))
    assert res.T_optical_from_ct is None and res.state == TRACKING and "unsupported image encoding" in res.error
    # judged lost: no pose, then the next frame is initialised (from the last good pose)
    threshold = pipe.config.lost_inlier_fraction
    pipe.config.lost_inlier_fraction = 1.01
    res = pipe.process(*frame(seq, 2))
    assert res.T_optical_from_ct is None and res.state == LOST and "tracking lost" in res.error
    # its overlay: the frame without an outline, a red border, the state and the reason
    lost = pipe.overlay(res).astype(int)
    assert np.all(lost[0, :, 0] > 200) and np.all(lost[0, :, 1] < 100)
    assert ((lost[80:, :, 1] - np.maximum(lost[80:, :, 0], lost[80:, :, 2])) > 60).sum() == 0
    pipe.config.lost_inlier_fraction = threshold
    res = pipe.process(*frame(seq, 2))
    assert res.T_optical_from_ct is not None and res.details["mode"] == "initialise (last_good)" and res.state == TRACKING
    # overlay: the target's outline drawn in green on the frame, as connected lines (below the legend)
    rgb = pipe.overlay(res, latency_ms=42.0)
    assert rgb.shape == (seq.intrinsics.height, seq.intrinsics.width, 3) and rgb.dtype == np.uint8
    x = rgb[80:].astype(int)
    green = (x[..., 1] - np.maximum(x[..., 0], x[..., 2])) > 60
    assert green.sum() > 300
    from reg2d3d_ros.viz import OutlineOverlay

    outline = OutlineOverlay.from_ct(pipe.registrator.roi, "T7", neighbours=0)
    lines = outline.outlines(outline.target, res.T_optical_from_ct, seq.intrinsics.K(torch.float64), *rgb.shape[:2])
    assert len(lines) <= 3 and max(len(p) for p, _ in lines) > 150  # one outline (and maybe a small island), not dots
    # reset forgets the pose: the next frame waits for an initial pose again
    pipe.reset()
    res = pipe.process(*frame(seq, 3))
    assert res.T_optical_from_ct is None and "initial pose" in res.error


def test_transmission_frames(setting):
    from reg2d3d_ros.sim import XrayDegradation, simulate_sequence, xray_renderer
    from reg2d3d_ros.example import load_example

    seq = setting["seq"]
    cfg = setting["cfg"]
    pipe = RegistrationPipeline(PipelineConfig(**{**vars(cfg), "intensity": "transmission"}))
    pipe.registrator = setting["pipe"].registrator  # same target, no second load
    pipe.state = INITIALISING
    ct = load_example()
    tseq = simulate_sequence(xray_renderer(ct), seq.intrinsics, setting["poses"][:1], XrayDegradation(display="transmission"), seed=5)
    ci = seq.intrinsics.to_camera_info()
    pipe.set_camera_info(ci["k"], ci["width"], ci["height"])
    pipe.set_initial_pose(torch.from_numpy(seq.poses_mm[0]))
    res = pipe.process(*frame(tseq, 0))
    assert res.T_optical_from_ct is not None
    assert float(setting["mrpd"](res.T_optical_from_ct, torch.from_numpy(seq.poses_mm[0]), setting["pts"])) < 2.0


class FakeRegistrator:
    """Returns scripted inlier fractions (the pipeline's lost logic without registration cost)."""

    def __init__(self, fractions):
        self.fractions = list(fractions)
        self.calls = []

    def _result(self, mode, T):
        from reg2d3d_ros.ppc.register import RegistrationResult

        self.calls.append(mode)
        return RegistrationResult(T, 1, self.fractions.pop(0), 0.5, 0.3, 500, 0.01)

    def register(self, image, intr, T, config=None):
        return self._result("register", T)

    def track(self, image, intr, T, config=None):
        return self._result("track", T)


def fake_pipeline(registrator, scr=None, initial_pose: bool = True):
    """A pipeline on 8x8 frames around a stand-in registrator (and SCR), camera info set."""
    # the stand-ins return poses without images behind them: no gradient correlation or peak to
    # check; the inlier-fraction rules are tested with the 0.85 of the in-plane tracker
    pipe = RegistrationPipeline(PipelineConfig(accept_gradient_correlation=0.0, max_peak_offset_mm=0.0, lost_relative_gc=0.0,
                                               lost_relative_fraction=0.85))
    pipe.registrator, pipe.state, pipe.scr = registrator, INITIALISING, scr
    pipe.set_camera_info([100.0, 0, 3.5, 0, 100.0, 3.5, 0, 0, 1], 8, 8)
    if initial_pose:
        pipe.set_initial_pose(torch.eye(4, dtype=torch.float64))
    return pipe


def test_relative_inlier_drop_is_judged_lost():
    seq_img = (np.random.default_rng(0).random((8, 8)) * 1000).astype(np.uint16)
    f = encode_image(seq_img, "mono16")
    args = (f["encoding"], f["height"], f["width"], f["step"], f["data"])
    # init 0.72, tracking 0.70 0.73 0.71 0.69, then a jump: 0.47 (> absolute 0.3, < 0.85 x 0.71)
    fake = FakeRegistrator([0.72, 0.70, 0.73, 0.71, 0.69, 0.47, 0.70, 0.68])
    pipe = fake_pipeline(fake)
    states = [pipe.process(*args) for _ in range(8)]
    assert [s.T_optical_from_ct is not None for s in states] == [True] * 5 + [False, True, True]
    assert states[5].state == LOST and "dropped below 0.85 x its recent level 0.71" in states[5].error
    assert fake.calls == ["register"] + ["track"] * 4 + ["track", "register", "track"]  # re-initialised after the loss
    # a slow decline is followed (the reference is a running median), and 0.3 stays the absolute floor
    fake = FakeRegistrator([0.70, 0.68, 0.66, 0.64, 0.62, 0.60, 0.58, 0.56, 0.29])
    pipe = fake_pipeline(fake)
    states = [pipe.process(*args) for _ in range(9)]
    assert [s.state for s in states] == [TRACKING] * 8 + [LOST]
    assert "0.29 < 0.3" in states[-1].error
    # a re-initialisation that lands clearly below the level before the loss is rejected too
    # (e.g. on a neighbouring vertebra); a new initial pose clears the level
    fake = FakeRegistrator([0.72, 0.70, 0.73, 0.71, 0.40, 0.50, 0.50, 0.52])
    pipe = fake_pipeline(fake)
    states = [pipe.process(*args) for _ in range(6)]
    assert [s.state for s in states] == [TRACKING] * 4 + [LOST, LOST]
    assert "re-initialisation rejected" in states[5].error and fake.calls[-1] == "register"
    pipe.set_initial_pose(torch.eye(4, dtype=torch.float64))
    res = pipe.process(*args)
    assert res.T_optical_from_ct is not None and res.state == TRACKING


def test_a_12mm_jump_is_recovered_by_the_in_plane_search(setting):
    """After a loss, PPC's registration from the last good pose starts with the global in-plane
    search (search_range_mm, default 15): a jump beyond PPC's local capture range is recovered."""
    from reg2d3d_ros.example import load_example
    from reg2d3d_ros.sim import XrayDegradation, simulate_sequence, xray_renderer

    pipe, seq, pts, mrpd, poses = setting["pipe"], setting["seq"], setting["pts"], setting["mrpd"], setting["poses"]
    assert pipe.register_config.search_range_mm == PipelineConfig().search_range_mm == 15.0
    pipe.reset()
    ci = seq.intrinsics.to_camera_info()
    pipe.set_camera_info(ci["k"], ci["width"], ci["height"])
    pipe.set_initial_pose(poses[0])
    res = pipe.process(*frame(seq, 0))
    assert res.state == TRACKING and float(mrpd(res.T_optical_from_ct, poses[0], pts)) < 2.0
    jump = torch.eye(4, dtype=torch.float64)
    jump[:3, 3] = torch.tensor([-7.2, 9.6, 0.0], dtype=torch.float64)  # 12 mm across the image
    T_jump = jump @ poses[0]
    jseq = simulate_sequence(xray_renderer(load_example()), seq.intrinsics, T_jump[None], XrayDegradation(), seed=6)
    threshold = pipe.config.lost_inlier_fraction
    pipe.config.lost_inlier_fraction = 1.01  # the loss itself is tested elsewhere: force it
    res = pipe.process(*frame(jseq, 0))
    pipe.config.lost_inlier_fraction = threshold
    assert res.state == LOST and res.T_optical_from_ct is None
    res = pipe.process(*frame(jseq, 0))
    assert res.details["mode"] == "initialise (last_good)" and res.details["search_candidate"] >= 1, res.details
    assert res.T_optical_from_ct is not None, res.error
    assert float(mrpd(res.T_optical_from_ct, T_jump, pts)) < 2.0
    pipe.reset()


def test_initialisations_below_the_acceptance_thresholds_publish_nothing(setting):
    img = (np.random.default_rng(0).random((8, 8)) * 1000).astype(np.uint16)
    f = encode_image(img, "mono16")
    args = (f["encoding"], f["height"], f["width"], f["step"], f["data"])
    with pytest.raises(ConfigError, match="accept_inlier_fraction must be a number in"):
        RegistrationPipeline(PipelineConfig(accept_inlier_fraction=1.5))
    # the acceptance test applies to registrations only; tracking keeps its own lost logic
    fake = FakeRegistrator([0.45, 0.55, 0.40, 0.38])
    pipe = fake_pipeline(fake)
    pipe.config.accept_inlier_fraction = 0.5
    r = pipe.process(*args)
    assert r.T_optical_from_ct is None and r.state == LOST and "initialisation rejected: inlier fraction 0.45 < accept_inlier_fraction 0.5" in r.error
    pipe.set_initial_pose(torch.eye(4, dtype=torch.float64))
    r = pipe.process(*args)
    assert r.T_optical_from_ct is not None and r.state == TRACKING
    r = pipe.process(*args)  # a tracking update at 0.40 (> lost_inlier_fraction 0.3) is published
    assert r.T_optical_from_ct is not None and r.details["mode"] == "track"
    # the gradient correlation of the real registration: computed, reported, and a threshold above it rejects
    pipe, seq, poses = setting["pipe"], setting["seq"], setting["poses"]
    pipe.reset()
    ci = seq.intrinsics.to_camera_info()
    pipe.set_camera_info(ci["k"], ci["width"], ci["height"])
    default = pipe.config.accept_gradient_correlation
    assert default == 0.1
    try:
        pipe.config.accept_gradient_correlation = 0.05
        pipe.set_initial_pose(poses[0])
        r = pipe.process(*frame(seq, 0))
        assert r.T_optical_from_ct is not None and 0.05 <= r.details["gradient_correlation"] <= 1.0, r.error
        # the polish (on by default) ran, was kept, and the published pose is near the truth
        assert pipe.register_config.polish_levels and r.details["polish"]["kept"] and r.details["polish"]["ms"] > 0
        assert float(setting["mrpd"](r.T_optical_from_ct, poses[0], setting["pts"])) < 1.0
        gc = r.details["gradient_correlation"]
        pipe.reset()
        pipe.config.accept_gradient_correlation = min(1.0, gc + 0.05)
        pipe.set_initial_pose(poses[0])
        r = pipe.process(*frame(seq, 0))
        assert r.T_optical_from_ct is None and "initialisation rejected: gradient correlation" in r.error
    finally:
        pipe.config.accept_gradient_correlation = default
        pipe.reset()


class FakeSCR:
    """Stands in for the SCR initialiser: returns queued (accepted, pose) outcomes."""

    def __init__(self, outcomes):
        self.outcomes = list(outcomes)
        self.calls = 0

    def initialise(self, image, K, seed=0):
        from reg2d3d_ros.scr.model import SCRResult
        from reg2d3d_ros.scr.pnp import PnPResult

        self.calls += 1
        ok, T = self.outcomes.pop(0)
        pnp = PnPResult(T, 300, 200 if ok else 10, 0.66 if ok else 0.03, 1.0, 0.01)
        return SCRResult(T, ok, pnp.inlier_fraction, "" if ok else "SCR: 10 PnP inliers < 40", pnp, 0.02, 0.01, 400)


def test_scr_initialises_without_an_initial_pose_and_after_a_loss():
    img = (np.random.default_rng(0).random((8, 8)) * 1000).astype(np.uint16)
    f = encode_image(img, "mono16")
    args = (f["encoding"], f["height"], f["width"], f["step"], f["data"])
    T_scr = torch.eye(4, dtype=torch.float64)
    T_scr[2, 3] = 700.0

    class Recording(FakeRegistrator):
        def register(self, image, intr, T, config=None):
            self.starts = getattr(self, "starts", []) + [T.clone()]
            return super().register(image, intr, T, config)

    fake = Recording([0.7, 0.7, 0.2, 0.7, 0.7])
    scr = FakeSCR([(False, None), (True, T_scr), (True, T_scr), (False, None)])
    pipe = fake_pipeline(fake, scr, initial_pose=False)
    # 1: SCR rejects and there is no pose to fall back on: nothing published, the reason is given
    r = pipe.process(*args)
    assert r.T_optical_from_ct is None and r.state == INITIALISING and r.error.startswith("SCR:") and fake.calls == []
    # 2: SCR accepts: PPC registers from the SCR pose, then tracking takes over
    r = pipe.process(*args)
    assert r.T_optical_from_ct is not None and r.state == TRACKING and r.details["mode"] == "initialise (scr)"
    assert torch.equal(fake.starts[0], T_scr) and r.details["scr_inliers"] == 200
    r = pipe.process(*args)
    assert r.details["mode"] == "track"
    # 4: a loss (inlier fraction 0.2), 5: re-initialised by SCR again
    r = pipe.process(*args)
    assert r.state == LOST
    r = pipe.process(*args)
    assert r.details["mode"] == "initialise (scr)" and r.state == TRACKING and scr.calls == 3
    # an initial pose on the topic wins over SCR
    pipe.set_initial_pose(torch.eye(4, dtype=torch.float64))
    r = pipe.process(*args)
    assert r.details["mode"] == "initialise (initial_pose)" and scr.calls == 3
    # after a reset SCR runs again; when it rejects and no pose is known, nothing is published
    pipe.reset()
    r = pipe.process(*args)
    assert r.T_optical_from_ct is None and scr.calls == 4


def test_recover_and_refine_stages(setting):
    """recover: after a loss with no SCR model, intensity registration (GC + CMA-ES, time-bounded) from
    the last good pose, then PPC; refine: intensity registration of the initial pose before PPC."""
    from reg2d3d_ros.example import load_example
    from reg2d3d_ros.sim import XrayDegradation, simulate_sequence, xray_renderer

    seq, pts, mrpd, poses = setting["seq"], setting["pts"], setting["mrpd"], setting["poses"]
    with pytest.raises(ConfigError, match="recover must be one of"):
        RegistrationPipeline(PipelineConfig(recover="sift"))
    cfg = PipelineConfig(**{**setting["cfg"].__dict__, "recover": "gc", "refine": "gc", "intensity_budget_s": 1.0})
    pipe = RegistrationPipeline(cfg)
    pipe.load()
    ci = seq.intrinsics.to_camera_info()
    pipe.set_camera_info(ci["k"], ci["width"], ci["height"])
    # refine: a 3 mm off initial pose is refined by intensity, then registered by PPC
    shift = torch.eye(4, dtype=torch.float64)
    shift[:3, 3] = torch.tensor([3.0, -2.0, 0.0], dtype=torch.float64)
    pipe.set_initial_pose(shift @ poses[0])
    res = pipe.process(*frame(seq, 0))
    assert res.details.get("mode") == "initialise (initial_pose+refine)" and res.state == TRACKING, res.error
    ref = res.details["refine"]
    assert ref["similarity"] >= ref["start_similarity"] and ref["ms"] < 20_000
    assert float(mrpd(res.T_optical_from_ct, poses[0], pts)) < 2.0
    # a sudden jump of 8 mm in-plane: tracking is lost, then recovered
    jump = torch.eye(4, dtype=torch.float64)
    jump[:3, 3] = torch.tensor([8.0, 5.0, 0.0], dtype=torch.float64)
    T_jump = jump @ poses[1]
    jseq = simulate_sequence(xray_renderer(load_example()), seq.intrinsics, T_jump[None], XrayDegradation(), seed=5)
    threshold = pipe.config.lost_inlier_fraction
    pipe.config.lost_inlier_fraction = 1.01  # make sure this frame is judged lost (the jump may also do it)
    res = pipe.process(*frame(jseq, 0))
    assert res.state == LOST and res.T_optical_from_ct is None
    pipe.config.lost_inlier_fraction = threshold
    res = pipe.process(*frame(jseq, 0))
    assert res.details["mode"] == "initialise (last_good+recover)", res.details
    rec = res.details["recover"]
    assert rec["similarity"] > rec["start_similarity"] and rec["ms"] < 30_000
    if res.T_optical_from_ct is not None:  # published: it must be right
        assert float(mrpd(res.T_optical_from_ct, T_jump, pts)) < 2.0
    assert res.T_optical_from_ct is not None, f"not recovered: {res.error}"
