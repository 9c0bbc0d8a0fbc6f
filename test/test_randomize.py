"""Domain-randomised simulator: components, draws, frame composition and sequences."""

import json
import math
from dataclasses import asdict, fields, replace

import numpy as np
import pytest
import torch

from reg2d3d_ros.errors import ConfigError
from reg2d3d_ros.geometry import CArmIntrinsics, carm_pose
from reg2d3d_ros.images import ENCODINGS, INTENSITIES, decode_image, encode_image
from reg2d3d_ros.sim import (
    BONE_CONTRAST,
    Cylinder,
    DomainDraw,
    DomainRanges,
    compose_frame,
    domain_from_seed,
    domain_objects,
    draw_domain,
    project_cylinders,
    render_components,
    simulate_randomised_sequence,
    xray_renderer,
)
from reg2d3d_ros.sim.objects import project_cylinders_roi
from reg2d3d_ros.sim.randomize import COLLIMATORS, shutter_open_fraction
from reg2d3d_ros.volume import CTVolume

CENTER = np.array([10.0, 80.0, -160.0])
SIZE = 64
INTR = CArmIntrinsics.from_detector(1020.0, 307.2 / SIZE, SIZE, SIZE)


def phantom_ct() -> CTVolume:
    """A 3 mm chest-like phantom: air (partly below -1000 HU), fat, soft tissue, lungs, a vertebra."""
    d, h, w = 32, 48, 48
    k, j, i = np.meshgrid(np.arange(d), np.arange(h), np.arange(w), indexing="ij")
    x, y = (i - 23.5) / 23.5, (j - 23.5) / 23.5
    hu = np.full((d, h, w), -1000.0, dtype=np.float32)
    hu[:, :4, :] = -1024.0  # padding below -1000 HU: exercises the clip at mu = 0
    body = x**2 / 0.85 + y**2 / 0.55 < 1.0
    hu[body] = 40.0
    hu[body & (x**2 / 0.85 + y**2 / 0.55 > 0.85)] = -100.0  # fat layer
    for sx in (-0.45, 0.45):
        hu[((x - sx) ** 2 / 0.09 + (y + 0.05) ** 2 / 0.12 < 1.0) & body] = -800.0  # lungs
    r2 = x**2 + (y - 0.35) ** 2
    hu[(r2 < 0.03) & (k % 8 < 6)] = 300.0  # vertebral bodies (cancellous) ...
    hu[(r2 < 0.03) & (r2 > 0.018) & (k % 8 < 6)] = 1100.0  # ... with a cortical shell
    hu[(np.abs(x) < 0.05) & (y > 0.45) & (y < 0.7)] = 700.0  # spinous process
    T = np.diag([3.0, 3.0, 3.0, 1.0])
    T[:3, 3] = CENTER - np.array([23.5, 23.5, 15.5]) * 3.0
    return CTVolume(hu=hu, T_ct_from_ijk=T, source="phantom")


@pytest.fixture(scope="module")
def ct():
    return phantom_ct()


@pytest.fixture(scope="module")
def poses():
    return torch.stack([carm_pose(CENTER, 680.0), carm_pose(CENTER, 680.0, lao_deg=35.0, cran_deg=10.0)])


@pytest.fixture(scope="module")
def components(ct, poses):
    return render_components(ct, INTR, poses, binning=1)


def base_draw() -> DomainDraw:
    """Every effect on (noise off), so that changing any one field changes the image."""
    return DomainDraw(
        seed=1,
        bone_contrast=1.8,
        mu_scale=1.0,
        beam_hardening=0.03,
        photons_per_pixel=None,
        scatter_fraction=0.2,
        scatter_sigma_fraction=0.125,
        blur_sigma_px=0.8,
        heel_fraction=0.15,
        heel_angle_deg=30.0,
        gain=0.9,
        offset=0.05,
        window_low_pct=1.0,
        window_high_pct=99.0,
        transmission_exponent=0.5,
        gamma=1.2,
        encoding="mono16",
        bit_depth=12,
        display="attenuation",
        collimator="rect",
        collimator_half_width=0.4,
        collimator_half_height=0.42,
        collimator_radius=0.45,
        collimator_dx=0.03,
        collimator_dy=-0.02,
        collimator_angle_deg=10.0,
        table_strength=0.2,
        table_angle_deg=200.0,
        table_offset=0.3,
        wires=[{"points_uvz": [[-0.4, -0.1, 640.0], [0.0, 0.05, 650.0], [0.4, 0.1, 660.0]], "radius_mm": 0.8}],
        screws=[{"tip_uvz": [0.1, -0.15, 660.0], "direction": [0.6, 0.0, 0.8], "length_mm": 40.0, "radius_mm": 3.0}],
    )


#: field -> (new value, other fields that must change with it or that make the field matter)
CHANGES = {
    "bone_contrast": (2.5, {}),
    "mu_scale": (0.8, {}),
    "beam_hardening": (0.0, {}),
    "photons_per_pixel": (2000.0, {}),
    "scatter_fraction": (0.0, {}),
    "scatter_sigma_fraction": (0.25, {}),
    "blur_sigma_px": (0.0, {}),
    "heel_fraction": (0.0, {}),
    "heel_angle_deg": (210.0, {}),
    "gain": (0.7, {}),
    "offset": (0.0, {}),
    "window_low_pct": (4.0, {}),
    "window_high_pct": (96.0, {}),
    "transmission_exponent": (1.0, {"display": "transmission"}),
    "gamma": (0.7, {}),
    "encoding": ("32FC1", {"bit_depth": 32}),
    "bit_depth": (16, {}),
    "display": ("transmission", {}),
    "collimator": ("circle", {}),
    "collimator_half_width": (0.3, {}),
    "collimator_half_height": (0.3, {}),
    "collimator_radius": (0.35, {"collimator": "circle"}),
    "collimator_dx": (-0.05, {}),
    "collimator_dy": (0.06, {}),
    "collimator_angle_deg": (-12.0, {}),
    "table_strength": (0.0, {}),
    "table_angle_deg": (20.0, {}),
    "table_offset": (-0.2, {}),
    "wires": ([], {}),
    "screws": ([], {}),
}


def normalised(img: np.ndarray, draw: DomainDraw) -> np.ndarray:
    return img.astype(np.float64) / draw.max_code


def decoded(img: np.ndarray, encoding: str) -> np.ndarray:
    f = encode_image(img, encoding)
    return decode_image(f["encoding"], f["height"], f["width"], f["step"], f["data"])


def test_components_combine_to_the_renderers_image(ct, poses, components):
    assert components.shape == (2, 2, SIZE, SIZE) and components.dtype == np.float32
    assert components.min() >= 0.0 and components[:, 1].max() > 0.1  # there is bone
    K = INTR.K(dtype=torch.float64)
    for bc in (1.0, BONE_CONTRAST, 2.6):
        ref = xray_renderer(ct, bc, binning=1).render(poses, K, SIZE, SIZE).line_integral.numpy()
        lin = components[:, 0] + np.float32(bc) * components[:, 1]
        np.testing.assert_allclose(lin, ref, rtol=1e-5, atol=1e-5)
    # binning is the renderer's too
    comp2 = render_components(ct, INTR, poses[0], binning=2)
    ref2 = xray_renderer(ct, BONE_CONTRAST, binning=2).render(poses[0], K, SIZE, SIZE).line_integral.numpy()
    np.testing.assert_allclose(comp2[:, 0] + np.float32(BONE_CONTRAST) * comp2[:, 1], ref2, rtol=1e-5, atol=1e-5)


def test_every_field_reaches_the_image(components, poses):
    names = {f.name for f in fields(DomainDraw)} - {"seed"}  # the seed only records where the draw came from
    assert names == set(CHANGES), f"fields without a test change: {names ^ set(CHANGES)}"
    comp = components[0]
    for name, (value, extra) in CHANGES.items():
        base = replace(base_draw(), **{k: v for k, v in extra.items() if k != "bit_depth"})
        changed = replace(base, **{name: value, **extra})
        a = compose_frame(comp, base, np.random.default_rng(0), poses[0], INTR)
        b = compose_frame(comp, changed, np.random.default_rng(0), poses[0], INTR)
        for img, d in ((a, base), (b, changed)):
            arr = decoded(img, d.encoding)
            assert np.all(np.isfinite(arr)) and arr.std() > 0.05 * d.max_code, name
        if name in ("encoding", "bit_depth"):  # the same picture in other codes: dtype or code range change
            assert a.dtype != b.dtype or abs(float(a.max()) - float(b.max())) > 0.5 * base.max_code, name
            assert not np.array_equal(normalised(a, base), normalised(b, changed)), name  # and the quantisation
            continue
        diff = np.abs(normalised(a, base) - normalised(b, changed)).mean()  # fraction of the full scale
        assert diff > 1e-3, f"{name}: changing it to {value!r} changed the image by only {diff:.2e}"


def test_draws_are_reproducible_and_cover_their_ranges():
    ranges = DomainRanges()
    draws = [draw_domain(np.random.default_rng(0)) for _ in range(2)]
    assert draws[0] == draws[1]
    rng = np.random.default_rng(7)
    draws = [draw_domain(rng) for _ in range(200)]
    assert len({d.seed for d in draws}) == 200
    for d in draws[:20]:
        assert domain_from_seed(d.seed) == d  # reproducible from the recorded seed alone
        assert DomainDraw(**json.loads(json.dumps(asdict(d)))) == d  # JSON round trip

    def covers(values, lo_hi, log=False):
        v = np.asarray(values, dtype=np.float64)
        lo, hi = lo_hi
        if log:
            v, lo, hi = np.log(v), math.log(lo), math.log(hi)
        assert lo - 1e-9 <= v.min() and v.max() <= hi + 1e-9, (v.min(), v.max(), lo_hi)
        assert v.min() < lo + 0.1 * (hi - lo) and v.max() > hi - 0.1 * (hi - lo), (v.min(), v.max(), lo_hi)

    plain = ["bone_contrast", "mu_scale", "beam_hardening", "scatter_fraction", "scatter_sigma_fraction", "blur_sigma_px",
             "heel_fraction", "gain", "offset", "window_low_pct", "window_high_pct", "collimator_radius", "collimator_angle_deg",
             "table_offset"]  # fmt: skip
    for name in plain:
        covers([getattr(d, name) for d in draws], getattr(ranges, name))
    for name in ("photons_per_pixel", "gamma", "transmission_exponent"):
        covers([getattr(d, name) for d in draws], getattr(ranges, name), log=True)
    covers([d.collimator_half_width for d in draws] + [d.collimator_half_height for d in draws], ranges.collimator_half_size)
    covers([d.collimator_dx for d in draws] + [d.collimator_dy for d in draws], ranges.collimator_center_shift)
    covers([d.heel_angle_deg for d in draws] + [d.table_angle_deg for d in draws], (0.0, 360.0))
    tables = [d.table_strength for d in draws if d.table_strength > 0]
    assert 0.35 < len(tables) / len(draws) < 0.65
    covers(tables, ranges.table_strength)
    covers([w["radius_mm"] for d in draws for w in d.wires], ranges.wire_radius_mm)
    covers([s["length_mm"] for d in draws for s in d.screws], ranges.screw_length_mm)
    covers([s["radius_mm"] for d in draws for s in d.screws], ranges.screw_radius_mm)
    covers([s["tip_uvz"][2] for d in draws for s in d.screws], ranges.object_depth_mm)
    assert {d.encoding for d in draws} == set(ENCODINGS)
    assert {d.display for d in draws} == set(INTENSITIES)
    assert {d.collimator for d in draws} == set(COLLIMATORS)
    assert {d.bit_depth for d in draws if d.encoding == "mono16"} == set(ranges.mono16_bit_depths)
    assert {d.bit_depth for d in draws if d.encoding != "mono16"} == {8, 32}
    assert {len(d.wires) for d in draws} == {0, 1, 2} and {len(d.screws) for d in draws} == {0, 1, 2}
    # the ranges are the caller's
    narrow = DomainRanges(bone_contrast=(2.0, 2.0), encodings=(("mono8", 1.0),), n_wires=(0, 0))
    d = draw_domain(np.random.default_rng(1), narrow)
    assert d.bone_contrast == 2.0 and d.encoding == "mono8" and d.bit_depth == 8 and d.wires == []


def test_compose_frame_encodings_and_displays(components, poses):
    comp = components[0]
    for enc, bits, dtype in (("mono8", 8, np.uint8), ("mono16", 12, np.uint16), ("mono16", 16, np.uint16), ("32FC1", 32, np.float32)):
        d = replace(base_draw(), encoding=enc, bit_depth=bits, photons_per_pixel=5000.0)
        img = compose_frame(comp, d, np.random.default_rng(0), poses[0], INTR)
        assert img.dtype == dtype and img.shape == (SIZE, SIZE)
        assert img.max() <= d.max_code * (1 + 1e-6) and img.min() >= 0
        assert img.max() > 0.8 * d.max_code  # the window uses the range
    # transmission is bright where attenuation is dark (same physics, no shutter, heel or objects)
    plain = replace(
        base_draw(), collimator="none", heel_fraction=0.0, table_strength=0.0, wires=[], screws=[], encoding="32FC1", bit_depth=32
    )
    att = compose_frame(comp, plain, np.random.default_rng(0))
    tra = compose_frame(comp, replace(plain, display="transmission"), np.random.default_rng(0))
    assert np.corrcoef(att.ravel(), tra.ravel())[0, 1] < -0.8
    # shutters: few photons outside the field, bright in attenuation and dark in transmission
    for shape in ("rect", "circle"):
        d = replace(plain, collimator=shape, photons_per_pixel=5000.0)
        inside = shutter_open_fraction(d, SIZE, SIZE) > 0.99
        outside = shutter_open_fraction(d, SIZE, SIZE) < 0.01
        assert inside.any() and outside.any()
        att = compose_frame(comp, d, np.random.default_rng(0))
        tra = compose_frame(comp, replace(d, display="transmission"), np.random.default_rng(0))
        assert att[outside].mean() > att[inside].mean() + 0.2 and att[outside].mean() > 0.9
        assert tra[outside].mean() < tra[inside].mean() - 0.2 and tra[outside].mean() < 0.1
    # objects are dense: bright in attenuation (noise off, so only the objects differ)
    with_objects = replace(plain, wires=base_draw().wires, screws=base_draw().screws)
    a0 = compose_frame(comp, plain, np.random.default_rng(0), poses[0], INTR)
    a1 = compose_frame(comp, with_objects, np.random.default_rng(0), poses[0], INTR)
    L_obj = project_cylinders_roi(domain_objects(with_objects, INTR, poses[0]), poses[0], INTR.K(), SIZE, SIZE)
    assert (a1 - a0)[L_obj > 0.5].mean() > 0.1  # where they are, they are bright ...
    assert np.abs(a1 - a0)[L_obj == 0].mean() < 0.02  # ... elsewhere only the window moves a little


def test_objects_roi_projection_matches_full_projection(poses):
    cyl = domain_objects(base_draw(), INTR, poses[0]) + [Cylinder((0.0, 0.0, 200.0), (0.0, 0.0, 900.0), 2.0, 0.4)]
    for T in poses:
        full = project_cylinders(cyl, T, INTR.K(), SIZE, SIZE).numpy()
        roi = project_cylinders_roi(cyl, T, INTR.K(), SIZE, SIZE)
        assert full.max() > 1.0
        np.testing.assert_allclose(roi, full, atol=1e-7)


def test_randomised_sequence(components, poses):
    d = replace(domain_from_seed(11), photons_per_pixel=3000.0, encoding="mono8", bit_depth=8, display="transmission")
    comp = np.stack([components[0]] * 3)
    static = poses[:1].expand(3, 4, 4)
    extra = [Cylinder(tuple(CENTER + [0, -60.0, -30.0]), tuple(CENTER + [0, -60.0, 30.0]), 1.0, 0.5)]
    seq = simulate_randomised_sequence(comp, static, INTR, d, seed=4, objects=extra, fps=10.0, meta={"ct": "phantom"})
    assert seq.images.shape == (3, SIZE, SIZE) and seq.images.dtype == np.uint8
    assert seq.encoding == "mono8" and seq.intensity == "transmission"
    assert np.all(np.diff(seq.stamps_ns) == 100_000_000)
    assert seq.meta["domain"] == asdict(d) and seq.meta["ct"] == "phantom" and seq.meta["seed"] == 4
    json.dumps(seq.meta)  # goes into the bag's ground-truth JSON
    assert not np.array_equal(seq.images[0], seq.images[1])  # noise is per frame ...
    again = simulate_randomised_sequence(comp, static, INTR, d, seed=4, objects=extra, fps=10.0)
    assert np.array_equal(again.images, seq.images)  # ... and seeded
    quiet = simulate_randomised_sequence(comp, static, INTR, replace(d, photons_per_pixel=None), seed=4)
    assert np.array_equal(quiet.images[0], quiet.images[2])  # physics fixed within the sequence
    np.testing.assert_allclose(seq.poses_mm, static.numpy())


def test_invalid_inputs_raise_config_errors(components):
    with pytest.raises(ConfigError, match="bit_depth"):
        DomainDraw(encoding="mono8", bit_depth=12)
    with pytest.raises(ConfigError, match="display"):
        DomainDraw(display="negative")
    with pytest.raises(ConfigError, match="window"):
        DomainDraw(window_low_pct=50.0, window_high_pct=40.0)
    with pytest.raises(ConfigError, match="bone_contrast"):
        DomainRanges(bone_contrast=(2.0, 1.0))
    with pytest.raises(ConfigError, match="encodings"):
        DomainRanges(encodings=(("rgb8", 1.0),))
    with pytest.raises(ConfigError, match="components"):
        compose_frame(components[0, 0], DomainDraw(), np.random.default_rng(0))
    with pytest.raises(ConfigError, match="T_optical_from_ct_mm"):
        compose_frame(components[0], DomainDraw(), np.random.default_rng(0), objects=[Cylinder((0, 0, 0), (1, 0, 0), 1.0, 0.5)])
    with pytest.raises(ConfigError, match="seed"):
        domain_from_seed(-1)


def test_scatter_helper_block_path_and_source_weight():
    from reg2d3d_ros.sim.degrade import add_scatter

    y, x = np.mgrid[0:96, 0:80] / 10.0
    L = (3.0 + np.sin(x) * np.cos(0.7 * y) + 0.5 * np.cos(2.3 * x + y)).astype(np.float32)  # smooth anatomy
    L[:, :20] = 0.0  # air beside the patient
    primary = (1e4 * np.exp(-L)).astype(np.float32)
    exact = add_scatter(primary, 0.3, 16.0) - primary
    fast = add_scatter(primary, 0.3, 16.0, downsample=4) - primary
    assert fast.dtype == np.float32 and fast.shape == primary.shape
    err = np.abs(fast - exact) / exact.max()
    assert err[8:-8, 8:-8].max() < 0.005 and err.max() < 0.04  # block means: < 0.5 % inside, a few % at the corners
    # weighted by min(L, 1): the unattenuated beam beside the patient is no scatter source
    weighted = add_scatter(primary, 0.3, 16.0, source_weight=np.minimum(L, 1.0)) - primary
    assert weighted[:, 20:].mean() < 0.5 * exact[:, 20:].mean()
    assert add_scatter(primary, 0.0, 16.0) is primary
