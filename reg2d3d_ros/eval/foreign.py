"""Benchmark frames from a DRR renderer this project did not write (DiffDRR 0.6.1).

Held-out benchmark frames should not come from the renderer that registration uses, or a
benchmark would reward matching our own discretisation and attenuation model. This module runs
``benchmarks/foreign/render_diffdrr.py`` with the separate, git-ignored benchmark environment
``.venv-diffdrr`` (made by ``./scripts/setup_diffdrr_reference.sh``); nothing here imports
DiffDRR. DiffDRR renders with its own physics at its defaults (its HU -> density transform, its
Siddon ray tracer); see the script's docstring for the camera mapping, which puts every CT
point on the same pixel as :func:`reg2d3d_ros.geometry.project_points`.

* :func:`render_foreign` returns DiffDRR's raw images ``(F, H, W)`` for poses
  ``T_optical_from_ct`` and :class:`~reg2d3d_ros.geometry.CArmIntrinsics`, cached on disk under
  ``$REG2D3D_CACHE/foreign`` (default ``~/.cache/reg2d3d_ros/foreign``): the key hashes the CT
  file's content, the poses, ``K``, the image size, the render options and
  :data:`RENDERER_VERSION`, so a repeated call is a file read (and needs no DiffDRR).
* :func:`foreign_frame` turns those images into detector-like frames with a minimal image
  formation of our own (one global scale per sequence, Poisson noise, log conversion,
  quantisation).

The interpreter is ``$REG2D3D_FOREIGN_PYTHON`` if set, else ``<repo>/.venv-diffdrr/bin/python``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

import numpy as np

from ..errors import ConfigError, CTLoadError, ImageError

#: Repository root (the script and the benchmark environment live there).
REPO_ROOT = Path(__file__).resolve().parents[2]
#: The renderer script, run with the benchmark environment's Python.
SCRIPT = REPO_ROOT / "benchmarks" / "foreign" / "render_diffdrr.py"
#: Environment variable naming the benchmark interpreter.
PYTHON_ENV = "REG2D3D_FOREIGN_PYTHON"
#: DiffDRR version the script is pinned to (checked against what it reports).
DIFFDRR_VERSION = "0.6.1"
#: Part of the cache key: bump when the script's output for the same request changes.
RENDERER_VERSION = f"diffdrr=={DIFFDRR_VERSION}/render_diffdrr.py-v1"
#: Render options sent to the script: DiffDRR's default Siddon ray tracer on its default density,
#: computed in patches of 64 x 64 rays (``DRR(patch_size=64)``) from the density tensor stored in
#: ``(k, j, i)`` memory order, on one torch thread. The images are bit for bit those of DiffDRR's
#: default call, about 2x faster and with half the memory on 2 shared cores; see
#: ``benchmarks/foreign/README.md`` for the timings behind the choice. ``threads`` does not
#: change the result and is left out of the cache key.
DEFAULT_OPTIONS = {"renderer": "siddon", "patch_size": 64, "layout": "kji", "batch": 1, "threads": 1}

#: :func:`foreign_frame`: DiffDRR's values are scaled so that the sequence's 99th percentile
#: line integral is this (a thick chest path at fluoroscopy energies; 5 leaves ~0.7 % of the
#: photons, the project's simulator gives 5-6 behind the mediastinum).
TARGET_P99_LINE_INTEGRAL = 5.0


def default_python() -> Path:
    """Interpreter of the benchmark environment: ``$REG2D3D_FOREIGN_PYTHON`` or ``<repo>/.venv-diffdrr``."""
    env = os.environ.get(PYTHON_ENV)
    return Path(env).expanduser() if env else REPO_ROOT / ".venv-diffdrr" / "bin" / "python"


def foreign_cache_dir(cache_dir=None) -> Path:
    """Cache folder: ``cache_dir`` if given, else ``$REG2D3D_CACHE/foreign`` or ``~/.cache/reg2d3d_ros/foreign``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    from ..example import cache_dir as _base

    return _base() / "foreign"


_CT_HASHES: dict = {}


def ct_fingerprint(ct_path) -> str:
    """SHA-256 of the CT file's content (memoised per path, size and modification time)."""
    p = Path(ct_path).expanduser().resolve()
    try:
        st = p.stat()
    except OSError as exc:
        raise CTLoadError(f"CT file not found: {p}") from exc
    if not p.is_file():
        raise CTLoadError(f"CT path is not a file: {p} (the DiffDRR renderer reads one volume file, e.g. NIfTI)")
    memo = (str(p), st.st_size, st.st_mtime_ns)
    if memo not in _CT_HASHES:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _CT_HASHES[memo] = h.hexdigest()
    return _CT_HASHES[memo]


def _as_poses(poses_mm) -> np.ndarray:
    try:
        import torch

        if isinstance(poses_mm, torch.Tensor):
            poses_mm = poses_mm.detach().cpu().double().numpy()
    except ImportError:  # pragma: no cover - torch is a project dependency
        pass
    P = np.asarray(poses_mm, dtype=np.float64)
    if P.ndim == 2:
        P = P[None]
    if P.ndim != 3 or P.shape[1:] != (4, 4) or len(P) == 0:
        raise ConfigError(f"poses_mm must be (F, 4, 4) T_optical_from_ct, got shape {P.shape}")
    if not np.all(np.isfinite(P)):
        raise ConfigError("poses_mm contains NaN or infinite values")
    R = P[:, :3, :3]
    if not np.allclose(R @ np.swapaxes(R, 1, 2), np.eye(3), atol=1e-6) or np.any(np.linalg.det(R) <= 0):
        raise ConfigError("poses_mm must be rigid transforms with proper rotations")
    return np.ascontiguousarray(P)


def cache_key(ct_hash: str, poses_mm: np.ndarray, K: np.ndarray, height: int, width: int, options: dict) -> str:
    """Hex key of one render request (CT content, poses, K, size, options, renderer version)."""
    h = hashlib.sha256()
    h.update(RENDERER_VERSION.encode())
    h.update(ct_hash.encode())
    h.update(np.ascontiguousarray(poses_mm, dtype=np.float64).tobytes())
    h.update(np.ascontiguousarray(K, dtype=np.float64).tobytes())
    h.update(f"{int(height)}x{int(width)}".encode())
    h.update(json.dumps(options, sort_keys=True).encode())
    return h.hexdigest()[:32]


#: Render options a request may carry (see the script's docstring).
OPTION_NAMES = ("renderer", "n_points", "patch_size", "layout", "batch", "threads")


def build_request(ct_path, poses_mm, intrinsics, options: dict | None = None) -> dict:
    """The script's request for ``poses_mm`` and ``intrinsics`` (:data:`DEFAULT_OPTIONS` updated by ``options``)."""
    opts = dict(DEFAULT_OPTIONS)
    opts.update(options or {})
    unknown = set(opts) - set(OPTION_NAMES)
    if unknown:
        raise ConfigError(f"unknown foreign render option(s) {sorted(unknown)}; use {', '.join(OPTION_NAMES)}")
    request = {
        "ct_path": str(Path(ct_path).expanduser().resolve()),
        "poses_mm": _as_poses(poses_mm),
        "K": np.asarray(intrinsics.K().numpy(), dtype=np.float64),
        "height": int(intrinsics.height),
        "width": int(intrinsics.width),
    }
    request.update({k: v for k, v in opts.items() if v is not None})
    return request


def run_foreign(request: dict, python=None, progress: bool = True) -> dict:
    """Run the DiffDRR script on one request (no cache); returns the output ``.npz`` as a dict.

    Parameters
    ----------
    request : dict
        The request fields of ``benchmarks/foreign/render_diffdrr.py`` (``ct_path``,
        ``poses_mm``, ``K``, ``height``, ``width`` and optional render options or
        ``points_ct_mm``).
    python : path, optional
        Interpreter of the benchmark environment (default :func:`default_python`).
    progress : bool
        Stream the script's progress lines to stderr.

    Raises
    ------
    ConfigError
        The benchmark environment is missing, or the script failed (its last lines are quoted).
    """
    py = Path(python).expanduser() if python is not None else default_python()
    if not (py.is_file() and os.access(py, os.X_OK)):
        raise ConfigError(
            f"the DiffDRR benchmark environment is missing: no Python interpreter at {py}. "
            f"Run ./scripts/setup_diffdrr_reference.sh (it creates .venv-diffdrr), or point "
            f"${PYTHON_ENV} at an interpreter with diffdrr=={DIFFDRR_VERSION}."
        )
    if not SCRIPT.is_file():
        raise ConfigError(f"the DiffDRR render script {SCRIPT} is missing (reg2d3d_ros is not run from its repository checkout)")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    with tempfile.TemporaryDirectory(prefix="reg2d3d_foreign_") as tmp:
        req_path, out_path = Path(tmp) / "request.npz", Path(tmp) / "out.npz"
        np.savez(req_path, **{k: np.asarray(v) for k, v in request.items()})
        tail: deque = deque(maxlen=15)
        proc = subprocess.Popen(
            [str(py), str(SCRIPT), str(req_path), str(out_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            text=True,
            bufsize=1,
        )
        try:
            for line in proc.stdout:
                line = line.rstrip("\n")
                tail.append(line)
                if progress:
                    print(line, file=sys.stderr, flush=True)
            rc = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        if rc != 0 or not out_path.is_file():
            msg = "\n  ".join(tail) or "(no output)"
            raise ConfigError(f"the DiffDRR renderer ({py} {SCRIPT.name}) failed with exit status {rc}:\n  {msg}")
        with np.load(out_path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}


def render_foreign(
    ct_path, poses_mm, intrinsics, cache_dir=None, python=None, progress: bool = True, options: dict | None = None
) -> np.ndarray:
    """DiffDRR's images of a CT for a pose sequence, rendered once and cached.

    Parameters
    ----------
    ct_path : str or Path
        CT file (read by DiffDRR as it is; label maps are not used).
    poses_mm : torch.Tensor or np.ndarray
        ``(F, 4, 4)`` (or ``(4, 4)``) ``T_optical_from_ct``, mm (see :mod:`reg2d3d_ros.geometry`).
    intrinsics : CArmIntrinsics
        The camera; only ``K`` and the image size matter.
    cache_dir : path, optional
        Cache folder (default :func:`foreign_cache_dir`).
    python : path, optional
        Benchmark interpreter (default ``$REG2D3D_FOREIGN_PYTHON`` or ``<repo>/.venv-diffdrr``).
    progress : bool
        Stream the renderer's progress (one line per frame) to stderr.
    options : dict, optional
        Overrides of :data:`DEFAULT_OPTIONS` (``renderer``: ``"siddon"`` or ``"trilinear"``,
        ``n_points``, ``patch_size``, ``layout``, ``batch``, ``threads``); part of the cache key
        (except ``threads``).

    Returns
    -------
    np.ndarray
        ``(F, H, W)`` float32, DiffDRR's values (``int density ds``; DiffDRR's density is its
        HU transform normalised to ``[0, 1]``, so the unit is arbitrary: see :func:`foreign_frame`).

    Raises
    ------
    ConfigError
        The benchmark environment is missing (run ``./scripts/setup_diffdrr_reference.sh``) or
        the renderer failed.
    CTLoadError
        The CT file does not exist.
    """
    request = build_request(ct_path, poses_mm, intrinsics, options)
    P, K, H, W = request["poses_mm"], request["K"], request["height"], request["width"]
    opts = {k: request[k] for k in OPTION_NAMES if k in request and k != "threads"}
    key = cache_key(ct_fingerprint(ct_path), P, K, H, W, opts)
    folder = foreign_cache_dir(cache_dir)
    path = folder / f"{key}.npz"
    images = _read_cached(path, (len(P), H, W))
    if images is not None:
        if progress:
            print(f"[foreign] {len(P)} DiffDRR frame(s) {W}x{H} from the cache ({path})", file=sys.stderr, flush=True)
        return images
    if progress:
        print(f"[foreign] rendering {len(P)} frame(s) {W}x{H} with DiffDRR (cache miss: {path.name})", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    out = run_foreign(request, python=python, progress=progress)
    images = np.ascontiguousarray(out["images"], dtype=np.float32)
    if images.shape != (len(P), H, W):
        raise ConfigError(f"the DiffDRR renderer returned images of shape {images.shape}, expected {(len(P), H, W)}")
    meta = json.loads(str(out.get("meta_json", "{}")))
    version = str(out.get("diffdrr_version", meta.get("diffdrr_version", "")))
    if version and version != DIFFDRR_VERSION:
        raise ConfigError(
            f"the benchmark environment has diffdrr {version}, expected {DIFFDRR_VERSION}; "
            "rerun ./scripts/setup_diffdrr_reference.sh"
        )
    meta.update({"renderer_version": RENDERER_VERSION, "key": key, "wall_s": time.perf_counter() - t0})
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{key}.{os.getpid()}.tmp.npz"
    np.savez(tmp, images=images, meta_json=np.asarray(json.dumps(meta)))
    os.replace(tmp, path)
    return images


def _read_cached(path: Path, shape: tuple) -> np.ndarray | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            images = np.ascontiguousarray(z["images"], dtype=np.float32)
    except Exception:  # a truncated or foreign file: render again
        return None
    return images if images.shape == shape else None


def line_integral_scale(images, target_p99: float = TARGET_P99_LINE_INTEGRAL) -> float:
    """The one global factor that makes the 99th percentile of ``images`` equal ``target_p99``."""
    a = np.asarray(images, dtype=np.float64)
    if a.size == 0 or not np.all(np.isfinite(a)):
        raise ImageError("foreign images are empty or contain NaN / infinite values")
    p99 = float(np.percentile(a, 99.0))
    if p99 <= 0:
        raise ImageError(f"foreign images have no signal (99th percentile {p99})")
    return target_p99 / p99


def foreign_frame(images, photons_per_pixel: float = 5000.0, seed: int = 0, encoding: str = "mono16") -> np.ndarray:
    """Detector-like frames from DiffDRR's images, with a minimal image formation of our own.

    1. ``L = s * images`` with ONE factor ``s`` for the whole sequence
       (:func:`line_integral_scale`: the 99th percentile of ``L`` over all frames is
       :data:`TARGET_P99_LINE_INTEGRAL` = 5), so frame-to-frame changes are kept;
    2. quantum noise: ``N ~ Poisson(I0 exp(-L))`` with ``I0 = photons_per_pixel``;
    3. log conversion to attenuation: ``A = -log(max(N, 0.5) / I0)`` (bright = more material);
    4. quantisation with the simulator's fixed display scale
       (:data:`reg2d3d_ros.sim.degrade.ATTENUATION_SCALE`: mono16 ``round(6000 A)`` clipped to
       0..65535, mono8 ``round(24 A)``, 32FC1 ``A`` as float32).

    No scatter, blur, gain or offset: frames differ from the simulator's only through DiffDRR's
    projection and attenuation model (and this noise).

    Parameters
    ----------
    images : np.ndarray
        ``(F, H, W)`` (or ``(H, W)``) DiffDRR images of one sequence (:func:`render_foreign`).
    photons_per_pixel : float
        Unattenuated photons per pixel ``I0`` (the default 5000 leaves about 34 photons where
        ``L = 5``); ``None`` or ``inf`` disables the noise.
    seed : int
        Seed of the noise.
    encoding : str
        ``mono16`` (default), ``mono8`` or ``32FC1``.

    Returns
    -------
    np.ndarray
        Frames of the same shape, uint16 (mono16), uint8 (mono8) or float32 (32FC1).
    """
    from ..images import ENCODINGS
    from ..sim.degrade import ATTENUATION_SCALE

    if encoding not in ENCODINGS:
        raise ConfigError(f"encoding must be one of {sorted(ENCODINGS)}, got {encoding!r}")
    noisy = photons_per_pixel is not None and np.isfinite(photons_per_pixel)
    if noisy and photons_per_pixel <= 0:
        raise ConfigError(f"photons_per_pixel must be positive, got {photons_per_pixel}")
    a = np.asarray(images, dtype=np.float64)
    if a.ndim not in (2, 3):
        raise ImageError(f"images must be (F, H, W) or (H, W), got shape {a.shape}")
    L = np.clip(a * line_integral_scale(a), 0.0, None)
    if noisy:
        I0 = float(photons_per_pixel)
        counts = np.random.default_rng(seed).poisson(I0 * np.exp(-L)).astype(np.float64)
        att = -np.log(np.clip(counts, 0.5, None) / I0)
    else:
        att = L
    value = att * ATTENUATION_SCALE[encoding]
    if encoding == "32FC1":
        return value.astype(np.float32)
    hi = 65535 if encoding == "mono16" else 255
    return np.clip(np.rint(value), 0, hi).astype(ENCODINGS[encoding][0])
