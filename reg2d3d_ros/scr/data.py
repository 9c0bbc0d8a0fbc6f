"""Training data for scene coordinate regression, rendered from the patient's CT.

A *view* is a C-arm pose ``T_optical_from_ct`` drawn around the target structure: primary angle
(LAO/RAO) and secondary angle (cranial/caudal) uniform over wide ranges, the isocentre offset
from the target by a Gaussian (so that anatomy is often only partly in the field), and the
source-to-isocentre distance varied (table height). For each view the renderer gives, per pixel
of the network's image (``size x size``, the full detector area):

- the line integral through the whole CT (what the X-ray sees; degradations are applied on the
  fly at training time, see :func:`augment_frame`);
- the CT coordinates (mm) where the pixel's ray enters and leaves the scene bone (the
  vertebrae of the label map: the spine) and a hit mask.

The scene is the spine, not every bone: on the example CT a network trained with ribs and
sternum in the scene had a median scene-coordinate error of 15 mm on spine pixels but 40 mm on
the others (thin, repetitive ribs whose first/last crossings jump between neighbouring pixels),
and spent its capacity there; the spine is what the node registers.

Views are cached in chunks (``.npz``, float16 scene coordinates, 0.25 mm steps at 300 mm) so a
long rendering can be resumed. Seeds fix everything: view ``i`` of seed ``s`` is the same on
every machine.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from ..geometry.camera import carm_pose
from ..progress import bar, end_line

#: Label-name prefixes of the bones whose surfaces are the scene.
SCENE_LABEL_PREFIXES = ("vertebrae_",)


def scene_label_ids(ct, prefixes=SCENE_LABEL_PREFIXES) -> list:
    """Label ids of the scene bones (names starting with one of ``prefixes``) present in ``ct``'s label map."""
    if ct.labels is None:
        raise ConfigError(f"CT {ct.source} has no label map: the SCR scene is defined by bone labels")
    present = set(np.unique(ct.labels).tolist())
    ids = sorted(i for name, i in ct.label_names.items() if name.startswith(tuple(prefixes)) and i in present)
    if not ids:
        raise ConfigError(f"the label map of {ct.source} has none of the scene bones ({', '.join(prefixes)}...)")
    return ids


@dataclass(frozen=True)
class ViewDistribution:
    """How training (and evaluation) views are drawn around the target.

    Attributes
    ----------
    lao_deg : tuple of float
        Primary angle range (uniform), degrees; negative = RAO.
    cran_deg : tuple of float
        Secondary angle range (uniform), degrees; negative = caudal.
    offset_sigma_mm : tuple of float
        Standard deviation of the isocentre offset from the target along CT x, y, z (LPS), mm.
    sid_mm : tuple of float
        Source-to-isocentre distance range (uniform), mm.
    lateral_fraction : float
        Fraction of views that are lateral instead: primary angle ``+-`` a draw from
        ``lateral_deg`` (side drawn at random), secondary angle from ``cran_deg``.
    lateral_deg : tuple of float
        Primary angle range of the lateral views, degrees.
    """

    lao_deg: tuple = (-95.0, 95.0)
    cran_deg: tuple = (-20.0, 20.0)
    offset_sigma_mm: tuple = (25.0, 20.0, 40.0)
    sid_mm: tuple = (630.0, 730.0)
    lateral_fraction: float = 0.0
    lateral_deg: tuple = (80.0, 100.0)

    def sample(self, center_ct_mm, n: int, seed: int) -> torch.Tensor:
        """``(n, 4, 4)`` float64 poses ``T_optical_from_ct`` (mm) around ``center_ct_mm``.

        ``center_ct_mm`` is one centre ``(3,)`` or several ``(K, 3)`` (CT mm), one drawn per view.
        """
        rng = np.random.default_rng(seed)
        centers = np.asarray(center_ct_mm, dtype=np.float64).reshape(-1, 3)
        out = torch.zeros(n, 4, 4, dtype=torch.float64)
        for i in range(n):
            lao = rng.uniform(*self.lao_deg)
            cran = rng.uniform(*self.cran_deg)
            off = rng.normal(0.0, self.offset_sigma_mm)
            sid = rng.uniform(*self.sid_mm)
            c = centers[0]
            if len(centers) > 1:
                c = centers[rng.integers(len(centers))]
            if self.lateral_fraction > 0 and rng.random() < self.lateral_fraction:
                lao = float(rng.choice((-1.0, 1.0))) * rng.uniform(*self.lateral_deg)
            out[i] = carm_pose(c + off, sid, lao_deg=lao, cran_deg=cran)
        return out


#: Views where a C-arm is used on the spine (issue 22): AP +-45 deg LAO/RAO and lateral (30 %),
#: +-20 deg cranial/caudal, the isocentre within about a vertebra of the target (in the field).
CLINICAL_VIEWS = ViewDistribution(lao_deg=(-45.0, 45.0), cran_deg=(-20.0, 20.0), offset_sigma_mm=(10.0, 10.0, 12.0),
                                  sid_mm=(630.0, 730.0), lateral_fraction=0.3, lateral_deg=(80.0, 100.0))

#: Image formation of training views: ``classic`` caches one line integral and degrades it with
#: :func:`augment_frame`; ``randomised`` caches the water and bone components and draws the
#: domain-randomised physics of :mod:`reg2d3d_ros.sim.randomize` per sample.
PHYSICS = ("classic", "randomised")


@dataclass(frozen=True)
class SceneNormalisation:
    """Scene coordinates are regressed as ``(X_ct_mm - center_ct_mm) / scale_mm``."""

    center_ct_mm: tuple
    scale_mm: float = 100.0

    def normalise(self, x_ct_mm: torch.Tensor) -> torch.Tensor:
        """``(..., 3)`` CT mm to network units."""
        return (x_ct_mm - torch.as_tensor(self.center_ct_mm, dtype=x_ct_mm.dtype, device=x_ct_mm.device)) / self.scale_mm

    def denormalise(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., 3)`` network units to CT mm."""
        return x * self.scale_mm + torch.as_tensor(self.center_ct_mm, dtype=x.dtype, device=x.device)


def scene_occupancy(ct, binning: int = 2, scene_prefixes=SCENE_LABEL_PREFIXES):
    """``(binned volume, occupancy (D, H', W') float32)``: the CT binned ``binning x binning`` in-plane
    (mean HU) and the scene bones' occupancy on that grid (the mean of the full-resolution mask,
    so the surface stays where the mask's 0.5 level is)."""
    ids = scene_label_ids(ct, scene_prefixes)
    mask = np.isin(ct.labels, ids).astype(np.float32)
    vol = ct.binned((binning, binning, 1)) if binning > 1 else ct
    if binning > 1:
        nd, nh, nw = vol.hu.shape
        mask = mask[:nd, : nh * binning, : nw * binning].reshape(nd, 1, nh, binning, nw, binning).mean(axis=(1, 3, 5))
    return vol, mask


def scr_renderer(ct, binning: int = 2, step_mm: float | None = None, scene_prefixes=SCENE_LABEL_PREFIXES):
    """Renderer of the whole CT as the X-rays see it, with the scene bones as occupancy.

    The volume is binned ``binning x binning`` in-plane (:func:`scene_occupancy`). ``step_mm`` is
    the ray-marching step (default: the binned voxel size); surface crossings are refined by
    interpolation between samples, so a coarser step mainly smooths the DRR.
    """
    from ..drr import DRRRenderer
    from ..sim.physics import fluoro_attenuation

    vol, mask = scene_occupancy(ct, binning, scene_prefixes)
    return DRRRenderer(torch.as_tensor(fluoro_attenuation(vol.hu)), vol.T_ct_from_ijk, occupancy=torch.as_tensor(mask), step_mm=step_mm)


def scr_component_renderers(ct, binning: int = 2, step_mm: float | None = None, scene_prefixes=SCENE_LABEL_PREFIXES) -> tuple:
    """Renderers of the water and bone components (:func:`reg2d3d_ros.sim.physics.attenuation_components`).

    The water renderer carries the scene bones as occupancy (entry/exit coordinates), the bone
    renderer only its line integral; binning as :func:`scr_renderer`.
    """
    from ..drr import DRRRenderer
    from ..sim.physics import attenuation_components
    from ..volume import MU_WATER_PER_MM

    vol, occupancy = scene_occupancy(ct, binning, scene_prefixes)
    water, bone = attenuation_components(vol.hu, MU_WATER_PER_MM)
    return (DRRRenderer(torch.as_tensor(water), vol.T_ct_from_ijk, occupancy=torch.as_tensor(occupancy), step_mm=step_mm),
            DRRRenderer(torch.as_tensor(bone), vol.T_ct_from_ijk, step_mm=step_mm))


def render_views(renderer, K: torch.Tensor, size: int, poses: torch.Tensor, batch: int = 4) -> dict:
    """Render line integrals and scene coordinates of views.

    Parameters
    ----------
    renderer : DRRRenderer or tuple of DRRRenderer
        From :func:`scr_renderer` (needs occupancy), or the pair of
        :func:`scr_component_renderers` (then ``components`` replaces ``line_integral``).
    K : torch.Tensor
        ``(3, 3)`` intrinsics of the ``size x size`` image, pixels.
    size : int
        Image size, pixels.
    poses : torch.Tensor
        ``(N, 4, 4)`` ``T_optical_from_ct``, mm.

    Returns
    -------
    dict
        ``line_integral`` ``(N, size, size)`` float32 (or ``components`` ``(N, 2, size, size)``:
        water, bone); ``entry_ct_mm``, ``exit_ct_mm`` ``(N, size, size, 3)`` float32 (0 where no
        hit); ``hit`` ``(N, size, size)`` bool.
    """
    pair = isinstance(renderer, tuple)
    main = renderer[0] if pair else renderer
    n = len(poses)
    out = {
        "entry_ct_mm": np.zeros((n, size, size, 3), np.float32),
        "exit_ct_mm": np.zeros((n, size, size, 3), np.float32),
        "hit": np.zeros((n, size, size), bool),
    }
    if pair:
        out["components"] = np.zeros((n, 2, size, size), np.float32)
    else:
        out["line_integral"] = np.zeros((n, size, size), np.float32)
    with torch.no_grad():
        for s in range(0, n, batch):
            T = poses[s : s + batch].to(torch.float64)
            r = main.render(T, K.to(torch.float64), size, size, surfaces=True)
            e = s + T.shape[0]
            if pair:
                out["components"][s:e, 0] = r.line_integral.float().numpy()
                out["components"][s:e, 1] = renderer[1].render(T, K.to(torch.float64), size, size).line_integral.float().numpy()
            else:
                out["line_integral"][s:e] = r.line_integral.float().numpy()
            out["entry_ct_mm"][s:e] = r.entry_ct_mm.float().numpy()
            out["exit_ct_mm"][s:e] = r.exit_ct_mm.float().numpy()
            out["hit"][s:e] = r.hit.numpy()
    return out


@dataclass(frozen=True)
class DatasetSpec:
    """What a cached view set is: enough to re-create it exactly."""

    target: str
    center_ct_mm: tuple
    size: int
    n_views: int
    seed: int
    sdd_mm: float
    pixel_spacing_mm: float
    views: ViewDistribution = ViewDistribution()
    step_mm: float | None = None
    scene: tuple = SCENE_LABEL_PREFIXES
    physics: str = "classic"
    view_centers_ct_mm: tuple = ()

    def __post_init__(self):
        if self.physics not in PHYSICS:
            raise ConfigError(f"physics must be one of {PHYSICS}, got {self.physics!r}")

    def intrinsics(self):
        """The ``size x size`` camera of the views."""
        from ..geometry import CArmIntrinsics

        return CArmIntrinsics.from_detector(self.sdd_mm, self.pixel_spacing_mm, self.size, self.size)

    def poses(self) -> torch.Tensor:
        """``(n_views, 4, 4)`` ``T_optical_from_ct`` (mm), around ``view_centers_ct_mm`` when given, else the target."""
        centers = self.view_centers_ct_mm if len(self.view_centers_ct_mm) else self.center_ct_mm
        return self.views.sample(centers, self.n_views, self.seed)


def build_view_cache(ct, spec: DatasetSpec, folder: Path, chunk: int = 64, progress: bool = True) -> list:
    """Render (or resume rendering) the views of ``spec`` into ``folder``; returns the chunk files.

    A chunk that exists and matches the spec is kept, so an interrupted run resumes.
    """
    import json

    from ..geometry import CArmIntrinsics

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta_path = folder / "spec.json"
    meta = json.loads(json.dumps(asdict(spec)))
    if meta_path.exists() and {**_SPEC_DEFAULTS, **json.loads(meta_path.read_text())} != meta:
        raise ConfigError(f"{folder} holds views of another specification; use an empty folder")
    meta_path.write_text(json.dumps(meta, indent=1))
    K = spec.intrinsics().K(torch.float64)
    poses = spec.poses()
    renderer = None
    files = []
    t0 = time.time()
    for c0 in range(0, spec.n_views, chunk):
        path = folder / f"views_{c0:06d}.npz"
        files.append(path)
        c1 = min(spec.n_views, c0 + chunk)
        if path.exists():
            continue
        if renderer is None:
            make = scr_component_renderers if spec.physics == "randomised" else scr_renderer
            renderer = make(ct, step_mm=spec.step_mm, scene_prefixes=spec.scene)
        r = render_views(renderer, K, spec.size, poses[c0:c1])
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, poses=poses[c0:c1].numpy(), hit=r["hit"],
                 **{k: r[k].astype(np.float16) for k in ("line_integral", "components", "entry_ct_mm", "exit_ct_mm") if k in r})
        tmp.rename(path)
        if progress:
            _bar("rendering views", c1, spec.n_views, time.time() - t0)
    if progress:
        end_line()
    return files


#: Fields of :class:`DatasetSpec` added after caches were first written (an older ``spec.json`` lacks them).
_SPEC_DEFAULTS = {"physics": "classic", "view_centers_ct_mm": []}
_VIEW_KEYS = ("poses", "line_integral", "components", "entry_ct_mm", "exit_ct_mm", "hit")


def load_views(files) -> dict:
    """Concatenate cached chunks.

    Returns ``poses`` (N,4,4) f64, ``line_integral`` (N,H,W) f16 or ``components`` (N,2,H,W) f16,
    ``entry_ct_mm``/``exit_ct_mm`` (N,H,W,3) f16, ``hit`` (N,H,W) bool.
    """
    parts = [np.load(f) for f in files]
    return {k: np.concatenate([p[k] for p in parts]) for k in _VIEW_KEYS if k in parts[0]}


def open_views(folder: Path, files) -> dict:
    """The views of ``files`` as memory-mapped arrays (written once to ``folder/mmap/<key>.npy``).

    Training then reads each sample from disk through the page cache instead of holding every
    view in memory; the result is the same dictionary as :func:`load_views`.
    """
    folder = Path(folder) / "mmap"
    stamp = folder / "files.json"
    import json

    names = [Path(f).name for f in files]
    if not (stamp.exists() and json.loads(stamp.read_text()) == names):
        folder.mkdir(parents=True, exist_ok=True)
        views = load_views(files)
        for k, v in views.items():
            np.save(folder / f"{k}.npy", v)
        stamp.write_text(json.dumps(names))
    return {k: np.load(folder / f"{k}.npy", mmap_mode="r") for k in _VIEW_KEYS if (folder / f"{k}.npy").exists()}


#: The project's progress bar (:func:`reg2d3d_ros.progress.bar`), under the name the training loops import.
_bar = bar


# -- network input ---------------------------------------------------------------------------
def normalise_frame(att: torch.Tensor) -> torch.Tensor:
    """Per-image standardisation of attenuation-like frames: invariant to gain and offset.

    Parameters
    ----------
    att : torch.Tensor
        ``(B, 1, H, W)`` attenuation-like images (bright = more material), any float dtype.
    """
    mean = att.mean(dim=(-2, -1), keepdim=True)
    std = att.std(dim=(-2, -1), keepdim=True).clamp_min(1e-6)
    return (att - mean) / std


def resize_frame(att: torch.Tensor, size: int) -> torch.Tensor:
    """Area-resize ``(B, 1, H, W)`` frames to ``(B, 1, size, size)`` (the network's grid)."""
    if att.shape[-2:] == (size, size):
        return att
    return torch.nn.functional.interpolate(att, size=(size, size), mode="area")


def augment_frame(line_integral: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A randomly degraded attenuation frame ``(H, W)`` float32 from a line integral.

    Dose, scatter, blur and gain vary per call (the simulator's model, :mod:`reg2d3d_ros.sim.degrade`);
    a random rectangle is erased (set to the image mean) half of the time, as an occlusion.
    """
    from ..sim.degrade import XrayDegradation, degrade

    p = XrayDegradation(
        photons_per_pixel=float(10 ** rng.uniform(4.3, 6.0)), scatter_fraction=float(rng.uniform(0.0, 0.15)),
        blur_sigma_px=float(rng.uniform(0.0, 1.0)), gain=float(rng.uniform(0.7, 1.3)), encoding="32FC1",
    )
    img = degrade(line_integral.astype(np.float32), p, rng)
    if rng.random() < 0.5:
        h, w = img.shape
        eh, ew = int(rng.uniform(0.05, 0.3) * h), int(rng.uniform(0.05, 0.3) * w)
        y, x = int(rng.integers(0, h - eh)), int(rng.integers(0, w - ew))
        img[y : y + eh, x : x + ew] = img.mean()
    return img.astype(np.float32)


def randomised_frame(components: np.ndarray, T_optical_from_ct_mm, intrinsics, rng: np.random.Generator, ranges=None) -> np.ndarray:
    """An attenuation-like frame ``(H, W)`` float32 of one view with a random domain draw.

    The physics, display, encoding, collimator, table and foreign objects are drawn from
    ``ranges`` (:class:`reg2d3d_ros.sim.randomize.DomainRanges`, default: the simulator's) and
    composed by :func:`reg2d3d_ros.sim.randomize.compose_frame`; the encoded frame is turned back
    into attenuation as the node does (:func:`reg2d3d_ros.images.to_attenuation` with the draw's
    display), so the network sees what the node gives it.

    Parameters
    ----------
    components : np.ndarray
        ``(2, H, W)`` water and bone line integrals (dimensionless).
    T_optical_from_ct_mm : torch.Tensor
        ``(4, 4)`` pose of the view, mm (places the draw's objects).
    intrinsics : CArmIntrinsics
        The view's ``H x W`` camera.
    """
    from ..images import to_attenuation
    from ..sim import randomize as rz

    draw = rz.draw_domain(rng, rz.DomainRanges() if ranges is None else ranges)
    T = torch.tensor(np.asarray(T_optical_from_ct_mm), dtype=torch.float64)
    frame = rz.compose_frame(np.asarray(components, dtype=np.float32), draw, rng, T, intrinsics, T_reference_mm=T)
    return to_attenuation(frame, draw.display)


def view_frame(views: dict, i: int, rng: np.random.Generator, intrinsics=None) -> np.ndarray:
    """The degraded attenuation-like frame ``(H, W)`` float32 of view ``i`` (either physics)."""
    if "components" in views:
        return randomised_frame(views["components"][i], views["poses"][i], intrinsics, rng)
    return augment_frame(np.asarray(views["line_integral"][i], dtype=np.float32), rng)


class SCRDataset(torch.utils.data.Dataset):
    """Views as network samples: degraded frame, normalised scene coordinates, hit masks.

    Items: ``image`` ``(1, H, W)`` float32 (standardised), ``coords`` ``(6, H, W)`` float32
    (entry xyz, exit xyz in network units), ``hit`` ``(1, H, W)`` float32, ``pose`` ``(4, 4)``.
    Views with ``components`` get a new domain draw per epoch (:func:`randomised_frame`, needs
    ``intrinsics``), views with a ``line_integral`` the classic degradation (:func:`augment_frame`).
    """

    def __init__(self, views: dict, norm: SceneNormalisation, augment: bool = True, seed: int = 0, intrinsics=None):
        if "components" in views and intrinsics is None:
            raise ConfigError("views with randomised physics need the views' intrinsics")
        self.v = views
        self.norm = norm
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self.intrinsics = intrinsics

    def __len__(self) -> int:
        return len(self.v["poses"])

    def __getitem__(self, i: int):
        rng = np.random.default_rng((self.seed, self.epoch, i))
        if self.augment:
            img = view_frame(self.v, i, rng, self.intrinsics)
        elif "components" in self.v:
            from ..sim.randomize import DomainDraw, compose_frame

            img = compose_frame(np.asarray(self.v["components"][i], dtype=np.float32), DomainDraw(encoding="32FC1", bit_depth=32), rng)
        else:
            img = np.asarray(self.v["line_integral"][i], dtype=np.float32)
        image = normalise_frame(torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None, None])[0]
        e = self.norm.normalise(torch.from_numpy(np.asarray(self.v["entry_ct_mm"][i], dtype=np.float32)))
        x = self.norm.normalise(torch.from_numpy(np.asarray(self.v["exit_ct_mm"][i], dtype=np.float32)))
        hit = torch.from_numpy(np.array(self.v["hit"][i]))[None].float()
        coords = torch.cat([e, x], dim=-1).permute(2, 0, 1) * hit
        return {"image": image, "coords": coords, "hit": hit, "pose": torch.from_numpy(np.array(self.v["poses"][i]))}


__all__ = [
    "CLINICAL_VIEWS", "PHYSICS", "SCENE_LABEL_PREFIXES", "DatasetSpec", "open_views", "randomised_frame", "scr_component_renderers",
    "view_frame", "SCRDataset", "SceneNormalisation", "ViewDistribution", "augment_frame",
    "build_view_cache", "load_views", "normalise_frame", "render_views", "resize_frame", "scene_label_ids",
    "scr_renderer",
]
