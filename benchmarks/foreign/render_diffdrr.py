#!/usr/bin/env python3
"""Render benchmark frames with DiffDRR 0.6.1, a DRR renderer this project did not write.

Run with the separate, git-ignored benchmark environment made by
``scripts/setup_diffdrr_reference.sh`` (never with the project's ``.venv``)::

    .venv-diffdrr/bin/python benchmarks/foreign/render_diffdrr.py REQUEST.npz OUT.npz

This script never imports ``reg2d3d_ros``; the library calls it through
:func:`reg2d3d_ros.eval.foreign.render_foreign`, which writes the request, streams this
script's progress lines and caches the result.

Request (``.npz``)
------------------
``ct_path``     str, the CT file (NIfTI etc.); no label map is used.
``poses_mm``    ``(F, 4, 4)`` float64 ``T_optical_from_ct`` in the project's convention: CT frame
                = SimpleITK physical (LPS) mm; optical frame origin at the X-ray source, +z along
                the principal ray towards the detector, +x along image columns, +y along rows.
``K``           ``(3, 3)`` ``[[fx, 0, cx], [0, fy, cy], [0, 0, 1]]``, pixels; pixel centres at
                integers, ``[u, v, 1]^T ~ K (R p + t)``.
``height``, ``width``  image size.
Optional: ``renderer`` (``"siddon"``, DiffDRR's default, or ``"trilinear"``), ``n_points``
(trilinear samples per ray, DiffDRR's default 500), ``batch`` (poses per DiffDRR call, default
1), ``patch_size`` (DiffDRR's ``patch_size``, default none), ``layout`` (``"ijk"``, DiffDRR's, or
``"kji"``: the same density tensor stored in the memory order ``grid_sample`` reads, identical
images, see :meth:`DiffDRRScene.drr`), ``threads`` (torch threads, default torch's own),
``sdd_mm`` (lower bound of the detector distance, see "Camera"), ``points_ct_mm`` ``(N, 3)`` (CT
points whose pixel positions under DiffDRR's own ray geometry are returned, for geometry checks).

Output (``.npz``)
-----------------
``images``            ``(F, H, W)`` float32: DiffDRR's image ``img[0, 0]`` of each pose, unchanged.
``points_uv``         ``(F, N, 2)`` (only with ``points_ct_mm``): where DiffDRR's rays put the
                      points, continuous ``(u, v)`` = (column, row), pixel centres at integers.
``seconds_per_frame`` float, wall time of the rendering loop divided by ``F``.
``meta_json``         JSON: diffdrr / torch versions, renderer and options, the detector
                      (``sdd``, ``delx``, ``dely``, ``x0``, ``y0``), threads,
                      ``T_ct_from_world``, the target reprojection check, timings.

Physics: DiffDRR's own, at its defaults. The subject is ``diffdrr.data.read(ct_path)`` with its
defaults (``orientation="AP"``, ``bone_attenuation_multiplier=1``, ``center_volume=True``), so the
volume is DiffDRR's ``transform_hu_to_density`` (HU <= -800 set to the soft-tissue minimum, the
result shifted and scaled to ``[0, 1]``); the renderer is DiffDRR's ``Siddon`` (nearest-voxel,
exact path lengths) unless ``renderer="trilinear"``. DiffDRR returns ``|target - source| *
sum(density * dalpha)``, i.e. ``int density ds`` in mm x (normalised density): a line integral
with an arbitrary (per-CT) unit, to be rescaled by the caller.

Camera. DiffDRR's detector (``Detector._initialize_carm`` + ``forward``) puts the source at the
origin of its camera frame and the centre of pixel ``(row r, col c)`` at

    p_cam = ( -delx (c - (W-1)/2) + x0,  -dely (r - (H-1)/2) + y0,  sdd )   (reverse_x_axis=True)

and maps the camera frame to its world by ``w = pose @ reorient @ p_cam``. Its world is torchio's
RAS frame of the volume re-centred on the volume centre: ``w = A ijk`` with ``A`` the subject's
affine; the project's CT frame is ``p_ct = T_ct_from_ijk ijk`` (SimpleITK), so
``T_world_from_ct = A inv(T_ct_from_ijk)``. With ``p_opt = diag(-1, -1, 1) p_cam`` the pixel
``(c, r)`` projects as ``u = c``, ``v = r`` exactly when

    delx = sdd / fx,  dely = sdd / fy,  x0 = (cx - (W-1)/2) delx,  y0 = (cy - (H-1)/2) dely,
    pose = T_world_from_ct inv(T_optical_from_ct) diag(-1, -1, 1, 1) inv(reorient).

(The sign of ``p_opt`` makes ``diag(-1,-1,1)`` a rotation: with DiffDRR's default
``reverse_x_axis=True`` its camera is right-handed, no mirroring.) ``sdd`` only sets where the
rays stop: it is chosen beyond the far corner of the CT box in every pose (max of 1.05 x the
largest corner depth + 10 mm and the optional request ``sdd_mm``), so that every ray crosses the
whole volume, as the project's renderer integrates through the whole box. The geometry is
checked here on each run: the detector targets DiffDRR builds are projected back with
``K, T_optical_from_ct`` and must land on their own pixel centres (within 1e-2 px, float32).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

#: ``p_opt = OPT_FROM_CAM p_cam`` for DiffDRR's default detector (reverse_x_axis=True).
OPT_FROM_CAM = np.diag([-1.0, -1.0, 1.0, 1.0])
#: Largest allowed reprojection error of DiffDRR's pixel targets under (K, T), pixels.
TARGET_CHECK_PX = 1e-2


def log(msg: str) -> None:
    print(f"[diffdrr] {msg}", file=sys.stderr, flush=True)


def lps_affine(image) -> np.ndarray:
    """Voxel index (i, j, k) -> SimpleITK physical (LPS) mm, as the project reads the CT."""
    T = np.eye(4)
    T[:3, :3] = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3) * np.asarray(image.GetSpacing())[None, :]
    T[:3, 3] = image.GetOrigin()
    return T


def _scalar(z, key, default=None, cast=float):
    if key not in z.files:
        return default
    v = z[key]
    v = v.item() if v.shape == () else v
    return default if v is None else cast(v)


def read_request(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        req = {
            "ct_path": str(z["ct_path"]),
            "poses_mm": np.asarray(z["poses_mm"], dtype=np.float64),
            "K": np.asarray(z["K"], dtype=np.float64),
            "height": int(z["height"]),
            "width": int(z["width"]),
            "renderer": _scalar(z, "renderer", "siddon", str),
            "n_points": _scalar(z, "n_points", 500, int),
            "batch": _scalar(z, "batch", 1, int),
            "patch_size": _scalar(z, "patch_size", 0, int) or None,
            "layout": _scalar(z, "layout", "ijk", str),
            "threads": _scalar(z, "threads", 0, int) or None,
            "sdd_mm": _scalar(z, "sdd_mm", 0.0, float),
            "points_ct_mm": np.asarray(z["points_ct_mm"], dtype=np.float64) if "points_ct_mm" in z.files else None,
        }
    P = req["poses_mm"]
    if P.ndim == 2:
        P = req["poses_mm"] = P[None]
    if P.ndim != 3 or P.shape[1:] != (4, 4) or not np.all(np.isfinite(P)):
        raise SystemExit(f"poses_mm must be finite (F, 4, 4), got shape {P.shape}")
    R = P[:, :3, :3]
    if not np.allclose(R @ np.swapaxes(R, 1, 2), np.eye(3), atol=1e-6) or np.any(np.linalg.det(R) < 0):
        raise SystemExit("poses_mm must be rigid transforms (proper rotations)")
    K = req["K"]
    if K.shape != (3, 3) or K[0, 1] != 0 or K[1, 0] != 0 or K[0, 0] <= 0 or K[1, 1] <= 0 or not np.allclose(K[2], [0, 0, 1]):
        raise SystemExit(f"K must be [[fx, 0, cx], [0, fy, cy], [0, 0, 1]] with fx, fy > 0, got {K.tolist()}")
    if req["renderer"] not in ("siddon", "trilinear"):
        raise SystemExit(f"renderer must be 'siddon' or 'trilinear', got {req['renderer']!r}")
    if req["height"] <= 0 or req["width"] <= 0 or req["batch"] <= 0:
        raise SystemExit("height, width and batch must be positive")
    return req


def detector_params(K: np.ndarray, height: int, width: int, sdd: float) -> dict:
    """DiffDRR detector arguments that reproduce ``K`` (see the module docstring)."""
    fx, fy, cx, cy = (float(K[0, 0]), float(K[1, 1]), float(K[0, 2]), float(K[1, 2]))
    sdd = float(sdd)  # Python floats: DiffDRR builds its calibration with torch.tensor(...)
    delx, dely = sdd / fx, sdd / fy
    return {"sdd": sdd, "height": height, "width": width, "delx": delx, "dely": dely,
            "x0": (cx - (width - 1) / 2.0) * delx, "y0": (cy - (height - 1) / 2.0) * dely}


def choose_sdd(poses: np.ndarray, corners_ct: np.ndarray, hint: float) -> float:
    """Source-detector distance beyond the CT box in every pose (rays cross the whole volume)."""
    depth = np.einsum("fj,nj->fn", poses[:, 2, :3], corners_ct) + poses[:, 2, 3][:, None]
    return float(max(hint, 1.05 * depth.max() + 10.0, 100.0))


class DiffDRRScene:
    """The CT as DiffDRR reads it, with the map between DiffDRR's world and the project's CT frame."""

    def __init__(self, ct_path):
        import SimpleITK as sitk
        from diffdrr.data import read

        ct_path = Path(ct_path).expanduser()
        if not ct_path.is_file():
            raise SystemExit(f"CT file not found: {ct_path}")
        self.ct_path = ct_path
        img = sitk.ReadImage(str(ct_path))
        T_ct_from_ijk = lps_affine(img)
        size_ijk = np.asarray(img.GetSize(), dtype=np.float64)
        self.subject = read(ct_path)  # DiffDRR's defaults: orientation "AP", its HU -> density, centred
        if tuple(self.subject.volume.data.shape[1:]) != tuple(int(n) for n in size_ijk):
            raise SystemExit(f"torchio and SimpleITK disagree on the CT size: "
                             f"{tuple(self.subject.volume.data.shape[1:])} vs {tuple(size_ijk)}")
        # Same voxel order on both sides (one slice is enough to catch a flipped axis).
        k = int(size_ijk[2]) // 2
        if not np.array_equal(self.subject.volume.data[0, :, :, k].numpy().astype(np.float32),
                              sitk.GetArrayFromImage(img)[k].T.astype(np.float32)):
            raise SystemExit("torchio and SimpleITK disagree on the voxel order of the CT")
        A = np.asarray(self.subject.volume.affine, dtype=np.float64)  # DiffDRR world <- ijk
        self.T_world_from_ct = A @ np.linalg.inv(T_ct_from_ijk)
        Rw = self.T_world_from_ct[:3, :3]
        if not np.allclose(Rw @ Rw.T, np.eye(3), atol=1e-5):
            raise SystemExit("DiffDRR's world frame is not a rigid transform of the CT frame")
        self.reorient = self.subject.reorient.numpy().astype(np.float64)
        corners_ijk = np.array([[i, j, kk] for i in (-0.5, size_ijk[0] - 0.5) for j in (-0.5, size_ijk[1] - 0.5)
                                for kk in (-0.5, size_ijk[2] - 0.5)])
        self.corners_ct = corners_ijk @ T_ct_from_ijk[:3, :3].T + T_ct_from_ijk[:3, 3]

    def drr(self, K, height, width, sdd, renderer="siddon", patch_size=None, layout="ijk"):
        """DiffDRR's ``DRR`` module for the camera ``K`` (radiological default ``reverse_x_axis``).

        ``layout="kji"`` keeps DiffDRR's density tensor (same shape ``(I, J, K)``, same values)
        but stores it in ``(k, j, i)`` memory order: DiffDRR samples it through
        ``volume.permute(2, 1, 0)``, which is then contiguous for ``grid_sample``. Only the
        memory order changes; the images are identical bit for bit, and faster to compute.
        """
        from diffdrr.drr import DRR

        det = detector_params(K, height, width, sdd)
        if patch_size and height * width < patch_size**2:
            patch_size = None  # DiffDRR renders H*W // patch_size**2 chunks: at least one
        drr = DRR(self.subject, **det, reverse_x_axis=True, renderer=renderer, patch_size=patch_size)
        if layout == "kji":
            drr.density = drr.density.permute(2, 1, 0).contiguous().permute(2, 1, 0)
        elif layout != "ijk":
            raise SystemExit(f"layout must be 'ijk' (DiffDRR's) or 'kji', got {layout!r}")
        return drr, det

    def world_poses(self, poses_mm: np.ndarray) -> np.ndarray:
        """DiffDRR poses ``(F, 4, 4)``: ``T_world_from_ct inv(T_optical_from_ct) OPT_FROM_CAM inv(reorient)``."""
        return (self.T_world_from_ct[None] @ np.linalg.inv(poses_mm) @ OPT_FROM_CAM[None]
                @ np.linalg.inv(self.reorient)[None])


def render(scene: DiffDRRScene, drr, poses_mm: np.ndarray, K: np.ndarray, batch: int = 1, render_kwargs=None,
           points_ct_mm=None, progress: bool = True):
    """Render ``poses_mm`` with ``drr``; returns images, points_uv, worst target reprojection, s/frame."""
    import torch
    from diffdrr.pose import RigidTransform

    render_kwargs = render_kwargs or {}
    F, H, W = len(poses_mm), drr.detector.height, drr.detector.width
    poses_world = scene.world_poses(poses_mm)
    images = np.zeros((F, H, W), dtype=np.float32)
    points_uv = np.zeros((F, 0 if points_ct_mm is None else len(points_ct_mm), 2))
    worst = 0.0
    rr, cc = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    pix = np.stack([cc.ravel(), rr.ravel()], axis=1)
    t0 = time.perf_counter()
    with torch.no_grad():
        for start in range(0, F, batch):
            stop = min(F, start + batch)
            pose = RigidTransform(torch.as_tensor(poses_world[start:stop], dtype=torch.float32))
            images[start:stop] = drr(pose, **render_kwargs)[:, 0].numpy()  # (B, 1, H, W) -> (B, H, W)
            # Geometry check on DiffDRR's own rays: its pixel targets project onto their pixels.
            source, target = drr.detector(pose, None)  # world, (B, 1, 3) and (B, H*W, 3)
            for b, f in enumerate(range(start, stop)):
                T_opt_from_world = poses_mm[f] @ np.linalg.inv(scene.T_world_from_ct)
                tg = target[b].double().numpy() @ T_opt_from_world[:3, :3].T + T_opt_from_world[:3, 3]
                uv = tg[:, :2] / tg[:, 2:3] * np.diag(K)[:2] + K[:2, 2]
                worst = max(worst, float(np.abs(uv - pix).max()))
                if points_ct_mm is not None and len(points_ct_mm):
                    pw = points_ct_mm @ scene.T_world_from_ct[:3, :3].T + scene.T_world_from_ct[:3, 3]
                    points_uv[f] = rays_to_pixels(source[b, 0].double().numpy(), target[b].double().numpy(), pw, H, W)
            if progress:
                log(f"frame {stop}/{F} ({(time.perf_counter() - t0) / stop:.2f} s/frame)")
    return images, points_uv, worst, (time.perf_counter() - t0) / F


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("request", type=Path)
    ap.add_argument("out", type=Path)
    args = ap.parse_args(argv)
    req = read_request(args.request)

    import torch

    if req["threads"]:
        torch.set_num_threads(req["threads"])
    import diffdrr

    t_start = time.perf_counter()
    F, H, W = len(req["poses_mm"]), req["height"], req["width"]
    log(f"diffdrr {diffdrr.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads); "
        f"{F} frame(s) {W}x{H}, renderer {req['renderer']}")
    scene = DiffDRRScene(req["ct_path"])
    sdd = choose_sdd(req["poses_mm"], scene.corners_ct, req["sdd_mm"])
    drr, det = scene.drr(req["K"], H, W, sdd, renderer=req["renderer"], patch_size=req["patch_size"],
                         layout=req["layout"])
    render_kwargs = {"n_points": req["n_points"]} if req["renderer"] == "trilinear" else {}
    log(f"CT read in {time.perf_counter() - t_start:.1f} s; sdd {sdd:.1f} mm, delx {det['delx']:.4f} mm, "
        f"dely {det['dely']:.4f} mm, x0 {det['x0']:.3f} mm, y0 {det['y0']:.3f} mm")
    images, points_uv, worst, seconds_per_frame = render(
        scene, drr, req["poses_mm"], req["K"], batch=req["batch"], render_kwargs=render_kwargs,
        points_ct_mm=req["points_ct_mm"])
    if worst > TARGET_CHECK_PX:
        raise SystemExit(f"camera conversion failed: DiffDRR's pixel targets reproject {worst:.3g} px off")

    meta = {
        "renderer_name": "DiffDRR",
        "diffdrr_version": diffdrr.__version__,
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "renderer": req["renderer"],
        "renderer_kwargs": render_kwargs,
        "patch_size": req["patch_size"],
        "layout": req["layout"],
        "batch": req["batch"],
        "read": "diffdrr.data.read(ct_path) defaults: orientation='AP', bone_attenuation_multiplier=1, center_volume=True",
        "detector": det,
        "reverse_x_axis": True,
        "T_ct_from_world": np.linalg.inv(scene.T_world_from_ct).tolist(),
        "target_reprojection_max_px": worst,
        "seconds_per_frame": seconds_per_frame,
        "seconds_total": time.perf_counter() - t_start,
        "ct_path": str(scene.ct_path),
    }
    out = {"images": images, "seconds_per_frame": np.float64(seconds_per_frame),
           "diffdrr_version": np.asarray(diffdrr.__version__), "renderer": np.asarray(req["renderer"]),
           "meta_json": np.asarray(json.dumps(meta))}
    if req["points_ct_mm"] is not None:
        out["points_uv"] = points_uv
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + f".{os.getpid()}.tmp.npz")
    np.savez(tmp, **out)
    os.replace(tmp, args.out)
    log(f"done: {F} frame(s), {seconds_per_frame:.2f} s/frame; DiffDRR targets reproject within "
        f"{worst:.1e} px; wrote {args.out}")
    return 0


def rays_to_pixels(S: np.ndarray, targets: np.ndarray, pts_w: np.ndarray, H: int, W: int) -> np.ndarray:
    """Where DiffDRR's ray geometry puts world points: (u, v), pixel centres at integers.

    The targets lie on a regular grid ``P(r, c) = P0 + c a + r b`` (ray ``n = r W + c``); a
    point is projected by intersecting the line source -> point with that plane.
    """
    rr, cc = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    X = np.stack([np.ones(H * W), cc.ravel(), rr.ravel()], axis=1)
    (P0, a, b), *_ = np.linalg.lstsq(X, targets, rcond=None)
    n = np.cross(a, b)
    d = pts_w - S[None]
    lam = ((P0 - S) @ n) / (d @ n)
    Y = S[None] + lam[:, None] * d - P0[None]
    return np.linalg.lstsq(np.stack([a, b], axis=1), Y.T, rcond=None)[0].T


if __name__ == "__main__":
    sys.exit(main())
