"""Issue 19: a new patient end to end (a 3 mm CT, the trial command) and its bad inputs.

The 3 mm CT is the example CT resampled (``ct_3mm`` in conftest.py); its target is L3.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from ros_graph import REPO

EXAMPLE_MODELS = REPO / "models" / "example_T8"


def run_cmd(args, cwd, timeout=600, env=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


def one_error_line(res, expected: str):
    """Exit status 2, the message on stderr in one line, no traceback."""
    assert res.returncode == 2, res.stderr[-3000:] + res.stdout[-2000:]
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if "error:" in ln]
    assert len(lines) == 1 and expected in lines[0], res.stderr


# -- provenance --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def example_ct():
    from reg2d3d_ros.example import load_example

    return load_example()


def test_the_example_model_records_what_it_was_made_from(example_ct):
    from reg2d3d_ros.example import FILES
    from reg2d3d_ros.provenance import check_models_provenance, read_models_provenance

    prov, where = read_models_provenance(EXAMPLE_MODELS)
    assert where.name == "scr.pt"
    assert prov["ct"]["sha256"] == FILES["cxr.nii.gz"] and prov["labels"]["sha256"] == FILES["mask.nii.gz"]
    assert prov["target"] == {"asked": "T8", "name": "vertebrae_T8", "id": 36}
    assert prov["geometry"] == {"sdd_mm": 1020.0, "detector_mm": 307.2, "size": 128}
    assert json.loads((EXAMPLE_MODELS / "scr.json").read_text())["provenance"] == prov
    with np.load(EXAMPLE_MODELS / "surface_T8.npz", allow_pickle=False) as z:
        assert json.loads(str(z["provenance_json"])) == prov
    assert check_models_provenance(EXAMPLE_MODELS, example_ct, "vertebrae_T8") == prov  # any name of the same label
    assert check_models_provenance("", example_ct, "T9") is None


def test_a_model_folder_for_another_target_ct_or_label_map_is_refused_in_one_line(example_ct, ct_3mm, tmp_path, caplog):
    from reg2d3d_ros.errors import ModelLoadError
    from reg2d3d_ros.provenance import check_models_provenance
    from reg2d3d_ros.volume import load_ct

    with pytest.raises(ModelLoadError) as e:
        check_models_provenance(EXAMPLE_MODELS, example_ct, "T9")
    msg = str(e.value)
    assert "\n" not in msg and "was made for target T8 (vertebrae_T8, id 36), not T9 (vertebrae_T9, id 35)" in msg
    assert "python -m reg2d3d_ros.prepare" in msg and "CT " not in msg.split(":")[0]
    ct3 = load_ct(ct_3mm["ct"], labels_path=ct_3mm["labels"])
    with pytest.raises(ModelLoadError, match=r"was made for CT ~/.cache/reg2d3d_ros/example_ct/cxr.nii.gz \(sha256 b1c29dfa53ea\), not "
                                             r".*ct.nii.gz .*; label map .*; target T8 .*not L3 \(vertebrae_L3, id 29\)"):
        check_models_provenance(EXAMPLE_MODELS, ct3, "L3")
    # a folder without a provenance (made before it was recorded) is accepted with a warning
    old = tmp_path / "old"
    old.mkdir()
    meta = json.loads((EXAMPLE_MODELS / "scr.json").read_text())
    del meta["provenance"]
    (old / "scr.json").write_text(json.dumps(meta))
    with caplog.at_level("WARNING", logger="reg2d3d_ros"):
        assert check_models_provenance(old, example_ct, "T9") is None
    assert "does not record what it was made from" in caplog.text
    (old / "scr.json").write_text(json.dumps({**meta, "provenance": "made on a Tuesday"}))
    with pytest.raises(ModelLoadError, match="provenance record is malformed"):
        check_models_provenance(old, example_ct, "T8")
    (old / "scr.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot be read"):
        check_models_provenance(old, example_ct, "T8")


# -- CT resolution -----------------------------------------------------------------------------
def test_a_3mm_ct_gives_as_many_contour_points_as_a_fine_one_with_its_surface_sampling(example_ct, ct_3mm):
    from reg2d3d_ros.ppc import PPCRegistrator, select_contours
    from reg2d3d_ros.ppc.surface import min_correspondences_at, surface_sampling
    from reg2d3d_ros.sim import CArmSetup, structure_center, view_pose
    from reg2d3d_ros.volume import load_ct

    assert surface_sampling(example_ct.spacing_mm) == {}  # the CT the thresholds were chosen on: unchanged
    ct3 = load_ct(ct_3mm["ct"], labels_path=ct_3mm["labels"])
    kw = surface_sampling(ct3.spacing_mm)
    assert kw["upsample"] == (3, 3, 3) and 0.75 < kw["high"] / 150.0 < 0.85 and kw["low"] / kw["high"] == pytest.approx(0.4)
    assert surface_sampling((0.78, 0.78, 5.0))["upsample"] == (1, 1, 5)  # thick slices: only along them
    setup = CArmSetup().at_size(256)
    intr = setup.intrinsics()
    K = intr.K(torch.float64)
    T = view_pose(structure_center(ct3, "L3"), setup, "lateral")

    def contour_points(reg):
        return len(select_contours(reg.pts, reg.normals, T, K, intr.height, intr.width, max_cos=0.15, cell_px=1.0, margin_px=3))

    native = PPCRegistrator.from_ct(ct3, "L3", moving="roi")
    sampled = PPCRegistrator.from_ct(ct3, "L3", moving="roi", surface_kwargs=kw)
    fine = PPCRegistrator.from_ct(example_ct, "L3", moving="roi")
    # the issue: a few hundred surface points, under 30 contour points in a lateral view
    assert len(native.pts) < 500 and contour_points(native) < 30
    assert len(sampled.pts) > 0.6 * len(fine.pts) and contour_points(sampled) > 0.6 * contour_points(fine) > 60
    # the sampled points lie on the fine CT's surface
    d = torch.cdist(sampled.pts[::20], fine.pts).min(dim=1).values
    assert float(d.median()) < 1.2
    # the minimum number of correspondences: 30 where the target gives plenty, what it can give otherwise
    assert min_correspondences_at(fine.pts, fine.normals, T, K) == 30
    assert min_correspondences_at(sampled.pts, sampled.normals, T, K) == 30
    assert min_correspondences_at(native.pts, native.normals, T, K) == 12
    assert min_correspondences_at(native.pts, native.normals, T, K, minimum=0) == 0
    T_out = T.clone()
    T_out[0, 3] += 1000.0  # far outside the frame: still the same expectation (the detector's borders do not count)
    assert min_correspondences_at(fine.pts, fine.normals, T_out, K) == 30


# -- the benchmark on another CT ---------------------------------------------------------------
def test_the_benchmark_runs_on_another_ct(ct_3mm, tmp_path, monkeypatch):
    from reg2d3d_ros.eval import benchmark as bm

    monkeypatch.setenv("REG2D3D_CACHE", str(tmp_path / "cache"))
    source = bm.CTSource(str(ct_3mm["ct"]), str(ct_3mm["labels"]))  # TotalSegmentator's built-in names
    spec = bm.SequenceSpec("tuning", "randomised", "L3", "ap", "static", 1, "true", 5)
    cheap = {"search_range_mm": 0.0, "polish": False, "guard": False}  # where the frames come from is tested, not the registration
    results = bm.run([spec], tmp_path / "out", overrides=cheap, progress=False, source=source)
    seqs, frames = bm.read_rows(results)
    assert [s["key"] for s in seqs] == [spec.key] and len(frames) == 1
    assert list((bm.ct_cache_root(source) / "components").glob("*.npy"))  # cached by the CT's content, not with the example's
    assert bm.ct_cache_root(source).parent == tmp_path / "cache" / "benchmark"


# -- the trial command -------------------------------------------------------------------------
def test_the_trial_command_runs_on_a_3mm_ct_through_the_node_and_writes_under_out_only(ct_3mm, tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    out = tmp_path / "trial"
    # tiny settings: the tiny tier, and registrations without the polish and the guard (a third of the time on 2 cores)
    args = ["reg2d3d_ros.trial", "--ct", ct_3mm["ct"], "--labels", ct_3mm["labels"], "--target", "L3", "--out", out, "--tier", "tiny",
            "--set", "polish=false", "--set", "guard=false"]
    res = run_cmd(args, cwd, env={"REG2D3D_CACHE": str(tmp_path / "cache")})
    assert res.returncode == 0, res.stderr[-3000:] + res.stdout[-3000:]
    assert f"trial: report {out / 'report.md'}" in res.stdout and "**All: " in res.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trial"]["target"] == "vertebrae_L3" and summary["trial"]["size"] == 128
    assert summary["trial"]["parameters"] == {"polish": "false", "guard": "false"}
    assert summary["total"]["sequences"] == 2 and summary["total"]["frames"] == 5
    assert len(summary["sequences"]) == 2 and all("answered" in s and "wrong" in s for s in summary["sequences"])
    # through the node: each sequence has the node's log, its ROS logs and the bag under --out
    for seq in sorted((out / "sequences").iterdir()):
        assert "ready in" in (seq / "node.log").read_text() and "Traceback" not in (seq / "node.log").read_text()
        assert (seq / "bag" / "metadata.yaml").is_file() and any((seq / "ros_log").iterdir())
    assert not any(cwd.iterdir()) and not (tmp_path / "cache").exists()  # nothing in the working directory or the user's cache
    # run again: every sequence is done, nothing is re-run
    res2 = run_cmd(args, cwd)
    assert res2.returncode == 0 and "2 already in" in res2.stdout and "starting the registration node" not in res2.stdout


def test_the_trial_command_answers_bad_inputs_with_one_line_and_status_2(ct_3mm, tmp_path, capsys):
    from reg2d3d_ros.trial import main

    base = ["--ct", ct_3mm["ct"], "--labels", ct_3mm["labels"], "--tier", "tiny"]
    out = tmp_path / "out"
    # as processes: status 2, one line, no traceback
    one_error_line(run_cmd(["reg2d3d_ros.trial", *base, "--target", "L3", "--out", out, "--models-dir", EXAMPLE_MODELS], tmp_path),
                   "was made for CT ~/.cache/reg2d3d_ros/example_ct/cxr.nii.gz")
    one_error_line(run_cmd(["reg2d3d_ros.trial", *base, "--target", "L3", "--out", out, "--set", "search_range_mm=500"], tmp_path),
                   "parameter search_range_mm must be a number in [0, 100] (unit: mm); got 500")

    def refused(args, expected):  # the same entry point in this process (faster)
        assert main([str(a) for a in args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("python -m reg2d3d_ros.trial: error: ") and expected in err, err

    refused(base + ["--target", "C1", "--out", out], "structure 'C1' (vertebrae_C1, id 50) has no voxels")
    refused(base + ["--target", "L3", "--out", out, "--set", "target=T8"], "the trial sets this parameter itself")
    refused(base + ["--target", "L3", "--out", out, "--set", "serach_range_mm=5"], "unknown node parameter 'serach_range_mm'")
    refused(base + ["--target", "L3", "--out", out, "--set", "polish"], "--set takes NAME=VALUE")
    refused(base + ["--target", "L3", "--out", out, "--init", "scr"], "--init scr needs --models-dir")
    refused(["--ct", tmp_path / "nope.nii.gz", "--labels", ct_3mm["labels"], "--target", "L3", "--out", out], "does not exist")
    assert not out.exists()  # nothing written for a refused input
    out.mkdir()
    (out / "trial.json").write_text(json.dumps({"ct_sha256": "0" * 64, "target_id": 29}))
    refused(base + ["--target", "L3", "--out", out], f"{out} holds a trial of other data or settings")
