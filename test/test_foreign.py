"""Benchmark frames from DiffDRR (:mod:`reg2d3d_ros.eval.foreign`).

The request / cache logic and :func:`foreign_frame` are tested with a fake "benchmark
interpreter" (an executable script that stands in for ``.venv-diffdrr/bin/python`` and writes a
known image). The real DiffDRR check runs only where ``.venv-diffdrr`` exists (made by
``./scripts/setup_diffdrr_reference.sh``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from reg2d3d_ros.errors import ConfigError, CTLoadError, ImageError
from reg2d3d_ros.eval import foreign
from reg2d3d_ros.eval.foreign import foreign_frame, render_foreign
from reg2d3d_ros.geometry import CArmIntrinsics, carm_pose
from reg2d3d_ros.sim.degrade import ATTENUATION_SCALE

# A stand-in for the benchmark interpreter: called as `python SCRIPT REQUEST OUT`, it checks the
# request, counts its calls and writes images[f, v, u] = f + 0.01 u + 0.001 v + t_z(f) / 1000.
FAKE = """#!{exe}
import os, sys
import numpy as np
script, req_path, out_path = sys.argv[1:4]
assert script.endswith("render_diffdrr.py"), script
if os.environ.get("FAKE_FAIL"):
    print("[diffdrr] something went wrong", file=sys.stderr)
    sys.exit(3)
with open(os.environ["FAKE_COUNTER"], "a") as f:
    f.write("x")
z = np.load(req_path)
assert os.path.isfile(str(z["ct_path"]))
P, K, H, W = z["poses_mm"], z["K"], int(z["height"]), int(z["width"])
assert P.shape[1:] == (4, 4) and K.shape == (3, 3) and str(z["renderer"]) == "siddon"
F = len(P)
v, u = np.mgrid[0:H, 0:W]
img = np.stack([f + 0.01 * u + 0.001 * v + P[f, 2, 3] / 1000.0 for f in range(F)]).astype(np.float32)
for f in range(F):
    print(f"[diffdrr] frame {{f + 1}}/{{F}}", file=sys.stderr, flush=True)
np.savez(out_path, images=img, diffdrr_version=np.asarray("0.6.1"), meta_json=np.asarray("{{}}"))
"""


def expected(P: np.ndarray, H: int, W: int) -> np.ndarray:
    v, u = np.mgrid[0:H, 0:W]
    return np.stack([f + 0.01 * u + 0.001 * v + P[f, 2, 3] / 1000.0 for f in range(len(P))]).astype(np.float32)


@pytest.fixture
def fake(tmp_path, monkeypatch):
    exe = tmp_path / "fakepython"
    exe.write_text(FAKE.format(exe=sys.executable))
    exe.chmod(0o755)
    counter = tmp_path / "calls"
    counter.write_text("")
    monkeypatch.setenv("FAKE_COUNTER", str(counter))
    monkeypatch.setenv("REG2D3D_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(foreign.PYTHON_ENV, raising=False)
    ct = tmp_path / "ct.nii.gz"
    ct.write_bytes(b"not really a CT, only hashed" * 10)
    return {"python": exe, "calls": lambda: len(counter.read_text()), "ct": ct, "tmp": tmp_path}


def poses(n: int = 3) -> torch.Tensor:
    return torch.stack([carm_pose([0.0, 0.0, 10.0 * i], 700.0, lao_deg=5.0 * i) for i in range(n)])


INTR = CArmIntrinsics.from_detector(1020.0, 4.8, 24, 16)


def test_render_foreign_runs_script_and_caches(fake, capsys):
    P = poses()
    img = render_foreign(fake["ct"], P, INTR, python=fake["python"])
    assert img.dtype == np.float32 and img.shape == (3, 16, 24)
    np.testing.assert_allclose(img, expected(P.numpy(), 16, 24), rtol=0, atol=1e-6)
    assert fake["calls"]() == 1
    err = capsys.readouterr().err
    assert "[diffdrr] frame 3/3" in err  # progress streamed
    files = list((fake["tmp"] / "cache" / "foreign").glob("*.npz"))  # $REG2D3D_CACHE/foreign
    assert len(files) == 1

    # Second call: from the cache, no renderer needed at all (even a missing interpreter is fine).
    again = render_foreign(fake["ct"], P.numpy(), INTR, python=fake["tmp"] / "missing" / "python", progress=False)
    np.testing.assert_array_equal(again, img)
    assert fake["calls"]() == 1


def test_cache_key_covers_ct_poses_intrinsics_size_and_options(fake):
    P = poses(2)
    run = lambda **kw: render_foreign(  # noqa: E731
        kw.pop("ct", fake["ct"]), kw.pop("P", P), kw.pop("intr", INTR), python=fake["python"], progress=False, **kw
    )
    run()
    assert fake["calls"]() == 1
    P2 = P.clone()
    P2[1, 0, 3] += 1e-6
    run(P=P2)
    assert fake["calls"]() == 2
    run(intr=CArmIntrinsics(24, 16, INTR.fx, INTR.fy, INTR.cx + 0.25, INTR.cy))
    assert fake["calls"]() == 3
    img = run(intr=INTR.scaled(0.5))
    assert img.shape == (2, 8, 12) and fake["calls"]() == 4
    run(options={"patch_size": None})
    assert fake["calls"]() == 5
    # Same content under another name: same key; changed content: new key.
    other = fake["tmp"] / "copy.nii.gz"
    other.write_bytes(fake["ct"].read_bytes())
    run(ct=other)
    assert fake["calls"]() == 5
    other.write_bytes(fake["ct"].read_bytes() + b"!")
    run(ct=other)
    assert fake["calls"]() == 6
    # Explicit cache_dir: a separate cache.
    render_foreign(fake["ct"], P, INTR, cache_dir=fake["tmp"] / "mine", python=fake["python"], progress=False)
    assert fake["calls"]() == 7 and len(list((fake["tmp"] / "mine").glob("*.npz"))) == 1


def test_corrupt_cache_file_is_rendered_again(fake):
    P = poses(1)
    render_foreign(fake["ct"], P, INTR, python=fake["python"], progress=False)
    (f,) = (fake["tmp"] / "cache" / "foreign").glob("*.npz")
    f.write_bytes(b"truncated")
    img = render_foreign(fake["ct"], P, INTR, python=fake["python"], progress=False)
    assert fake["calls"]() == 2
    np.testing.assert_allclose(img, expected(P.numpy(), 16, 24), atol=1e-6)


def test_env_variable_selects_the_interpreter(fake, monkeypatch):
    monkeypatch.setenv(foreign.PYTHON_ENV, str(fake["python"]))
    assert foreign.default_python() == fake["python"]
    render_foreign(fake["ct"], poses(1), INTR, progress=False)
    assert fake["calls"]() == 1


def test_missing_environment_is_a_clear_config_error(fake, monkeypatch):
    monkeypatch.setenv(foreign.PYTHON_ENV, str(fake["tmp"] / "no-venv" / "bin" / "python"))
    with pytest.raises(ConfigError, match="setup_diffdrr_reference.sh") as exc:
        render_foreign(fake["ct"], poses(1), INTR, progress=False)
    assert "no-venv" in str(exc.value)
    with pytest.raises(ConfigError, match="setup_diffdrr_reference.sh"):
        render_foreign(fake["ct"], poses(1), INTR, python=fake["tmp"] / "nothing", progress=False)
    # The default location (<repo>/.venv-diffdrr) is named when nothing is configured.
    monkeypatch.delenv(foreign.PYTHON_ENV)
    assert foreign.default_python() == foreign.REPO_ROOT / ".venv-diffdrr" / "bin" / "python"
    monkeypatch.setattr(foreign, "REPO_ROOT", fake["tmp"] / "checkout")
    with pytest.raises(ConfigError, match=r"checkout/\.venv-diffdrr/bin/python.*setup_diffdrr_reference\.sh"):
        render_foreign(fake["ct"], poses(1), INTR, progress=False)
    assert not (fake["tmp"] / "cache" / "foreign").exists() or not any((fake["tmp"] / "cache" / "foreign").iterdir())


def test_script_failure_and_bad_inputs(fake, monkeypatch):
    monkeypatch.setenv("FAKE_FAIL", "1")
    with pytest.raises(ConfigError, match="exit status 3(.|\n)*something went wrong"):
        render_foreign(fake["ct"], poses(1), INTR, python=fake["python"], progress=False)
    monkeypatch.delenv("FAKE_FAIL")
    with pytest.raises(CTLoadError):
        render_foreign(fake["tmp"] / "absent.nii.gz", poses(1), INTR, python=fake["python"])
    with pytest.raises(ConfigError, match="4, 4"):
        render_foreign(fake["ct"], np.zeros((2, 3, 4)), INTR, python=fake["python"])
    bad = poses(1).clone()
    bad[0, 0, 0] = -bad[0, 0, 0]  # a reflection
    with pytest.raises(ConfigError, match="rotation"):
        render_foreign(fake["ct"], bad, INTR, python=fake["python"])
    with pytest.raises(ConfigError, match="unknown"):
        render_foreign(fake["ct"], poses(1), INTR, python=fake["python"], options={"sdd": 3})
    assert fake["calls"]() == 0


# ----------------------------------------------------------------------------------------------
# foreign_frame
def test_foreign_frame_scale_is_global_and_documented():
    rng = np.random.default_rng(1)
    base = rng.uniform(0.0, 50.0, size=(16, 20)).astype(np.float32)
    images = np.stack([base, 0.5 * base])  # the second frame has half the material
    clean = foreign_frame(images, photons_per_pixel=None, encoding="32FC1")
    assert clean.dtype == np.float32 and clean.shape == images.shape
    np.testing.assert_allclose(np.percentile(clean, 99), foreign.TARGET_P99_LINE_INTEGRAL, rtol=1e-5)
    np.testing.assert_allclose(clean[1], 0.5 * clean[0], rtol=1e-5, atol=1e-6)  # one factor per sequence
    s = foreign.line_integral_scale(images)
    np.testing.assert_allclose(clean, images * s, rtol=1e-5, atol=1e-6)

    q = foreign_frame(images, photons_per_pixel=None)  # mono16, fixed display scale
    assert q.dtype == np.uint16
    np.testing.assert_allclose(q, np.rint(images * s * ATTENUATION_SCALE["mono16"]), atol=1)
    assert foreign_frame(images, photons_per_pixel=None, encoding="mono8").dtype == np.uint8
    assert foreign_frame(images[0]).shape == (16, 20)  # a single frame is accepted too


def test_foreign_frame_poisson_noise():
    L = np.full((4, 64, 64), 2.0, dtype=np.float32)
    L[:, :, :1] = 2.5  # makes the 99th percentile 2.5: scale 2 -> L = 4 in the flat part
    I0 = 5000.0
    a = foreign_frame(L, photons_per_pixel=I0, seed=3)
    b = foreign_frame(L, photons_per_pixel=I0, seed=3)
    c = foreign_frame(L, photons_per_pixel=I0, seed=4)
    assert a.dtype == np.uint16
    np.testing.assert_array_equal(a, b)  # deterministic for a seed
    assert not np.array_equal(a, c)
    att = a[:, :, 1:].astype(np.float64) / ATTENUATION_SCALE["mono16"]
    assert abs(att.mean() - 4.0) < 0.01
    # var(-log N/I0) ~ 1 / (I0 exp(-L)) for Poisson counts
    want = 1.0 / np.sqrt(I0 * np.exp(-4.0))
    assert abs(att.std() / want - 1.0) < 0.05
    with pytest.raises(ConfigError):
        foreign_frame(L, photons_per_pixel=-1.0)
    with pytest.raises(ConfigError):
        foreign_frame(L, encoding="rgb8")
    with pytest.raises(ImageError):
        foreign_frame(np.zeros((2, 8, 8)))


# ----------------------------------------------------------------------------------------------
# the real DiffDRR (only where the benchmark environment exists)
def _ncc(a, b):
    a = np.asarray(a, np.float64).ravel() - np.mean(a)
    b = np.asarray(b, np.float64).ravel() - np.mean(b)
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def _lsq_shift(ours, ref):
    """Sub-pixel (du, dv) with ref(u, v) ~ s ours(u + du, v + dv) + c (one Gauss-Newton step)."""
    gv, gu = np.gradient(ours)
    sl = (slice(2, -2), slice(2, -2))
    J = np.stack([gu[sl].ravel(), gv[sl].ravel(), ours[sl].ravel(), np.ones(ours[sl].size)], axis=1)
    x, *_ = np.linalg.lstsq(J, ref[sl].ravel(), rcond=None)
    return x[0] / x[2], x[1] / x[2]


def test_real_diffdrr_geometry_agrees():
    py = foreign.default_python()
    if not py.is_file():
        pytest.skip(f"no DiffDRR benchmark environment at {py} (./scripts/setup_diffdrr_reference.sh)")
    from reg2d3d_ros.drr import DRRRenderer
    from reg2d3d_ros.errors import DataNotFoundError
    from reg2d3d_ros.example import example_paths
    from reg2d3d_ros.geometry import project_points
    from reg2d3d_ros.volume import load_ct

    try:
        paths = example_paths()
    except DataNotFoundError as exc:
        pytest.fail(str(exc))
    with np.load(Path(__file__).resolve().parent / "data" / "diffdrr_reference.npz") as z:
        fid = z["fiducials_ct_lps_mm"]  # 20 label centroids (vertebrae, scapulae, claviculae, sternum)
        iso = z["isocentre_ct_lps_mm"]  # centre of T8
    # An oblique 64 x 64 view with an off-centre principal point.
    intr = CArmIntrinsics(64, 64, 212.5, 200.0, 31.9, 30.2)
    T = carm_pose(iso + np.array([10.0, -5.0, 20.0]), 680.0, lao_deg=35.0, cran_deg=10.0)[None]
    request = foreign.build_request(paths.ct, T, intr)  # what render_foreign sends
    out = foreign.run_foreign(dict(request, points_ct_mm=fid), progress=False)
    # DiffDRR's rays put every fiducial where our projection does.
    uv, depth = project_points(intr.K(), T, torch.as_tensor(fid)[None])
    off = np.linalg.norm(uv[0].numpy() - out["points_uv"][0], axis=1)
    inside = ((uv[0] >= 0) & (uv[0] <= 63)).all(dim=1).numpy()
    print(f"\n[foreign] fiducials: largest offset {off.max():.2e} px ({inside.sum()} of {len(fid)} in the image)")
    assert off.max() < 0.01 and inside.sum() >= 10 and bool((depth > 0).all())

    # Same picture as our renderer (density ~ (HU + 800)+ like DiffDRR's transform), no shift.
    theirs = out["images"][0].astype(np.float64)
    ct = load_ct(paths.ct)
    with torch.no_grad():
        ours = DRRRenderer(torch.as_tensor(np.clip(ct.hu + 800.0, 0, None)), ct.T_ct_from_ijk).render(
            T, intr.K(), 64, 64).line_integral[0].double().numpy()
        ours_mu = DRRRenderer.from_volume(ct).render(T, intr.K(), 64, 64).line_integral[0].double().numpy()
    du, dv = _lsq_shift(ours, theirs)
    gy, gx = np.gradient(ours)
    ty, tx = np.gradient(theirs)
    print(f"[foreign] NCC {_ncc(ours, theirs):.5f} (project mu: {_ncc(ours_mu, theirs):.5f}), gradient NCC "
          f"{_ncc(np.hypot(gx, gy), np.hypot(tx, ty)):.5f}, shift ({du:+.3f}, {dv:+.3f}) px")
    assert _ncc(ours, theirs) > 0.995
    assert _ncc(ours_mu, theirs) > 0.98
    assert _ncc(np.hypot(gx, gy), np.hypot(tx, ty)) > 0.98
    assert abs(du) < 0.1 and abs(dv) < 0.1
    frames = foreign_frame(theirs[None])
    assert frames.dtype == np.uint16 and frames.shape == (1, 64, 64)
