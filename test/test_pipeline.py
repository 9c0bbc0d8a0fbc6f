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
    with pytest.raises(ConfigError, match="ct_path"):
        RegistrationPipeline(PipelineConfig()).load()
    with pytest.raises(CTLoadError, match="does not exist"):
        RegistrationPipeline(PipelineConfig(ct_path=str(tmp_path / "x.nii.gz"), labels_path=str(tmp_path / "y.nii.gz"))).load()
    p = RegistrationPipeline(PipelineConfig())
    p.fail_load("cannot read CT")
    res = p.process(*frame_dummy())
    assert res.T_optical_from_ct is None and res.state == WAITING_FOR_CT and "cannot read CT" in res.error


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
    assert res.T_optical_from_ct is not None and res.state == TRACKING and res.details["mode"] == "initialise"
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
    pipe.config.lost_inlier_fraction = threshold
    res = pipe.process(*frame(seq, 2))
    assert res.T_optical_from_ct is not None and res.details["mode"] == "initialise" and res.state == TRACKING
    # overlay: contours drawn in green on the frame
    rgb = pipe.overlay(res)
    assert rgb.shape == (seq.intrinsics.height, seq.intrinsics.width, 3) and rgb.dtype == np.uint8
    green = (rgb[..., 1] == 230) & (rgb[..., 0] == 40)
    assert green.sum() > 50
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

    def register(self, image, intr, T):
        return self._result("register", T)

    def track(self, image, intr, T):
        return self._result("track", T)


def test_relative_inlier_drop_is_judged_lost():
    seq_img = (np.random.default_rng(0).random((8, 8)) * 1000).astype(np.uint16)
    f = encode_image(seq_img, "mono16")
    args = (f["encoding"], f["height"], f["width"], f["step"], f["data"])
    # init 0.72, tracking 0.70 0.73 0.71 0.69, then a jump: 0.47 (> absolute 0.3, < 0.85 x 0.71)
    fake = FakeRegistrator([0.72, 0.70, 0.73, 0.71, 0.69, 0.47, 0.70, 0.68])
    pipe = RegistrationPipeline(PipelineConfig())
    pipe.registrator, pipe.state = fake, INITIALISING
    pipe.set_camera_info([100.0, 0, 3.5, 0, 100.0, 3.5, 0, 0, 1], 8, 8)
    pipe.set_initial_pose(torch.eye(4, dtype=torch.float64))
    states = [pipe.process(*args) for _ in range(8)]
    assert [s.T_optical_from_ct is not None for s in states] == [True] * 5 + [False, True, True]
    assert states[5].state == LOST and "dropped below 0.85 x its recent level 0.71" in states[5].error
    assert fake.calls == ["register"] + ["track"] * 4 + ["track", "register", "track"]  # re-initialised after the loss
    # a slow decline is followed (the reference is a running median), and 0.3 stays the absolute floor
    fake = FakeRegistrator([0.70, 0.68, 0.66, 0.64, 0.62, 0.60, 0.58, 0.56, 0.29])
    pipe = RegistrationPipeline(PipelineConfig())
    pipe.registrator, pipe.state = fake, INITIALISING
    pipe.set_camera_info([100.0, 0, 3.5, 0, 100.0, 3.5, 0, 0, 1], 8, 8)
    pipe.set_initial_pose(torch.eye(4, dtype=torch.float64))
    states = [pipe.process(*args) for _ in range(9)]
    assert [s.state for s in states] == [TRACKING] * 8 + [LOST]
    assert "0.29 < 0.3" in states[-1].error
    # a re-initialisation that lands clearly below the level before the loss is rejected too
    # (e.g. on a neighbouring vertebra); a new initial pose clears the level
    fake = FakeRegistrator([0.72, 0.70, 0.73, 0.71, 0.40, 0.50, 0.50, 0.52])
    pipe = RegistrationPipeline(PipelineConfig())
    pipe.registrator, pipe.state = fake, INITIALISING
    pipe.set_camera_info([100.0, 0, 3.5, 0, 100.0, 3.5, 0, 0, 1], 8, 8)
    pipe.set_initial_pose(torch.eye(4, dtype=torch.float64))
    states = [pipe.process(*args) for _ in range(6)]
    assert [s.state for s in states] == [TRACKING] * 4 + [LOST, LOST]
    assert "re-initialisation rejected" in states[5].error and fake.calls[-1] == "register"
    pipe.set_initial_pose(torch.eye(4, dtype=torch.float64))
    res = pipe.process(*args)
    assert res.T_optical_from_ct is not None and res.state == TRACKING
