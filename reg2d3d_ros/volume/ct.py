"""CT volumes in the physical LPS frame (conventions: :mod:`reg2d3d_ros.geometry`).

A :class:`CTVolume` keeps the voxel array in ``(D, H, W) = (k, j, i)`` order and the affine
``T_ct_from_ijk`` (mm) that SimpleITK's ``TransformIndexToPhysicalPoint`` implements:
``p = origin + direction @ (spacing * ijk)``. Crops and binning update that affine so that
every voxel keeps its physical position; nothing is ever re-centred.
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..errors import CTLoadError, ConfigError

log = logging.getLogger(__name__)

#: Linear attenuation coefficient of water used by :meth:`CTVolume.mu`, 1/mm (about 70 keV).
MU_WATER_PER_MM = 0.02


def _affine_from_sitk(image) -> np.ndarray:
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    origin = np.asarray(image.GetOrigin(), dtype=np.float64)
    T = np.eye(4)
    T[:3, :3] = direction * spacing[None, :]
    T[:3, 3] = origin
    return T


def _read_sitk(path: Path, what: str):
    import SimpleITK as sitk

    if not path.exists():
        raise CTLoadError(f"{what} path does not exist: {path}")
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            series = reader.GetGDCMSeriesIDs(str(path))
            if not series:
                raise CTLoadError(f"{what} folder {path} holds no DICOM series (expected a folder of .dcm slices)")
            if len(series) > 1:
                log.warning("%s folder %s holds %d DICOM series; using the first (%s)", what, path, len(series), series[0])
            files = reader.GetGDCMSeriesFileNames(str(path), series[0])
            reader.SetFileNames(files)
            image = reader.Execute()
        else:
            image = sitk.ReadImage(str(path))
    except CTLoadError:
        raise
    except RuntimeError as exc:  # SimpleITK raises RuntimeError with a long ITK message
        first = str(exc).strip().splitlines()
        detail = next((ln for ln in first if "ERROR" in ln or "exception" in ln.lower()), first[0] if first else "")
        raise CTLoadError(
            f"cannot read {what} {path}: not a readable volume (NIfTI, NRRD, MHA or a DICOM folder). {detail.strip()}"
        ) from None
    if image.GetDimension() != 3:
        raise CTLoadError(f"{what} {path} is {image.GetDimension()}-D; a 3-D volume is required")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise CTLoadError(f"{what} {path} has {image.GetNumberOfComponentsPerPixel()} components per voxel; need 1")
    if min(image.GetSize()) < 2:
        raise CTLoadError(f"{what} {path} has size {image.GetSize()}; need at least 2 voxels along every axis")
    return image


@dataclass
class CTVolume:
    """A CT volume with its physical frame.

    Attributes
    ----------
    hu : np.ndarray
        ``(D, H, W)`` float32 Hounsfield units, array order ``(k, j, i)``.
    T_ct_from_ijk : np.ndarray
        ``(4, 4)`` float64 affine from continuous voxel index ``(i, j, k)`` to CT mm (LPS).
    labels : np.ndarray or None
        ``(D, H, W)`` integer label map on the same grid (e.g. TotalSegmentator), or ``None``.
    source : str
        Where the volume came from (for messages).
    """

    hu: np.ndarray
    T_ct_from_ijk: np.ndarray
    labels: np.ndarray | None = None
    source: str = ""
    label_names: dict = field(default_factory=dict)

    def __post_init__(self):
        self.hu = np.ascontiguousarray(self.hu, dtype=np.float32)
        self.T_ct_from_ijk = np.asarray(self.T_ct_from_ijk, dtype=np.float64)
        if self.hu.ndim != 3:
            raise CTLoadError(f"CT array must be 3-D (D, H, W), got shape {self.hu.shape}")
        if self.labels is not None and self.labels.shape != self.hu.shape:
            raise CTLoadError(f"label map shape {self.labels.shape} differs from CT shape {self.hu.shape}")
        if not np.all(np.isfinite(self.hu)):
            raise CTLoadError(f"CT {self.source} contains NaN or infinite values")

    # -- geometry -------------------------------------------------------------------------
    @property
    def shape_ijk(self) -> tuple:
        """Voxel counts ``(W, H, D)`` along ``(i, j, k)``."""
        d, h, w = self.hu.shape
        return (w, h, d)

    @property
    def spacing_mm(self) -> np.ndarray:
        """Voxel spacing ``(3,)`` along ``(i, j, k)`` in mm."""
        return np.linalg.norm(self.T_ct_from_ijk[:3, :3], axis=0)

    @property
    def T_ijk_from_ct(self) -> np.ndarray:
        """``(4, 4)`` inverse affine, CT mm to continuous voxel index."""
        return np.linalg.inv(self.T_ct_from_ijk)

    def ijk_to_ct(self, ijk: np.ndarray) -> np.ndarray:
        """Continuous indices ``(N, 3)`` ``(i, j, k)`` to CT points ``(N, 3)`` mm."""
        ijk = np.asarray(ijk, dtype=np.float64)
        return ijk @ self.T_ct_from_ijk[:3, :3].T + self.T_ct_from_ijk[:3, 3]

    def ct_to_ijk(self, pts_ct_mm: np.ndarray) -> np.ndarray:
        """CT points ``(N, 3)`` mm to continuous indices ``(N, 3)`` ``(i, j, k)``."""
        T = self.T_ijk_from_ct
        return np.asarray(pts_ct_mm, dtype=np.float64) @ T[:3, :3].T + T[:3, 3]

    def corners_ct_mm(self) -> np.ndarray:
        """The 8 corners ``(8, 3)`` of the volume's box (outer voxel faces), CT mm."""
        w, h, d = self.shape_ijk
        c = np.array([[i, j, k] for i in (-0.5, w - 0.5) for j in (-0.5, h - 0.5) for k in (-0.5, d - 0.5)])
        return self.ijk_to_ct(c)

    @property
    def center_ct_mm(self) -> np.ndarray:
        """Centre ``(3,)`` of the volume's box, CT mm."""
        w, h, d = self.shape_ijk
        return self.ijk_to_ct(np.array([[(w - 1) / 2, (h - 1) / 2, (d - 1) / 2]]))[0]

    # -- intensities and masks ------------------------------------------------------------
    def mu(self, mu_water_per_mm: float = MU_WATER_PER_MM) -> np.ndarray:
        """Linear attenuation ``(D, H, W)`` float32 in 1/mm: ``mu_w (1 + HU/1000)``, clipped at 0."""
        return np.clip(mu_water_per_mm * (1.0 + self.hu / 1000.0), 0.0, None).astype(np.float32)

    def bone_mask(self, threshold_hu: float = 200.0, label_ids=None) -> np.ndarray:
        """Boolean bone mask ``(D, H, W)``.

        Parameters
        ----------
        threshold_hu : float
            Voxels with HU above this are bone (used when ``label_ids`` is None).
        label_ids : iterable of int, optional
            If given, the mask is the union of these labels of the label map instead.
        """
        if label_ids is None:
            return self.hu > threshold_hu
        return self.label_mask(label_ids)

    def label_mask(self, label_ids) -> np.ndarray:
        """Boolean mask ``(D, H, W)`` of the union of label ids."""
        if self.labels is None:
            raise ConfigError(f"CT {self.source} has no label map; pass one to select structures")
        ids = np.atleast_1d(np.asarray(label_ids))
        return np.isin(self.labels, ids)

    def label_points_ct_mm(self, label_ids, max_points: int | None = None, seed: int = 0) -> np.ndarray:
        """Voxel centres ``(N, 3)`` (CT mm) inside the given labels, optionally subsampled."""
        kji = np.argwhere(self.label_mask(label_ids))
        if len(kji) == 0:
            raise ConfigError(f"labels {label_ids} are empty in {self.source}")
        if max_points is not None and len(kji) > max_points:
            idx = np.random.default_rng(seed).choice(len(kji), size=max_points, replace=False)
            kji = kji[np.sort(idx)]
        return self.ijk_to_ct(kji[:, ::-1].astype(np.float64))

    # -- sub-volumes ----------------------------------------------------------------------
    def crop_ijk(self, lo_ijk, hi_ijk) -> "CTVolume":
        """Sub-volume of voxels ``lo <= ijk < hi`` (clipped to the volume), same physical frame."""
        w, h, d = self.shape_ijk
        lo = np.maximum(np.asarray(lo_ijk, dtype=int), 0)
        hi = np.minimum(np.asarray(hi_ijk, dtype=int), [w, h, d])
        if np.any(hi - lo < 2):
            raise ConfigError(f"crop {lo.tolist()}..{hi.tolist()} leaves less than 2 voxels along an axis")
        sl = (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))
        T = self.T_ct_from_ijk.copy()
        T[:3, 3] = self.ijk_to_ct(lo[None].astype(np.float64))[0]
        labels = None if self.labels is None else np.ascontiguousarray(self.labels[sl])
        return replace(self, hu=np.ascontiguousarray(self.hu[sl]), T_ct_from_ijk=T, labels=labels)

    def crop_to_labels(self, label_ids, margin_mm: float = 10.0) -> "CTVolume":
        """Crop to the bounding box of the given labels plus a margin in mm (same frame)."""
        kji = np.argwhere(self.label_mask(label_ids))
        if len(kji) == 0:
            raise ConfigError(f"labels {label_ids} are empty in {self.source}; cannot crop to them")
        margin_vox = np.ceil(margin_mm / self.spacing_mm).astype(int)
        lo = kji.min(axis=0)[::-1] - margin_vox
        hi = kji.max(axis=0)[::-1] + 1 + margin_vox
        return self.crop_ijk(lo, hi)

    def binned(self, factors) -> "CTVolume":
        """Average ``factors = (fi, fj, fk)`` blocks of voxels (label map: majority by max-pool).

        The voxel centre of a block is the mean of its voxels' centres, so the physical frame is
        kept exactly. Trailing voxels that do not fill a block are dropped.
        """
        fi, fj, fk = (int(f) for f in factors)
        if min(fi, fj, fk) < 1:
            raise ConfigError(f"binning factors must be >= 1, got {factors}")
        d, h, w = self.hu.shape
        nd, nh, nw = d // fk, h // fj, w // fi
        hu = self.hu[: nd * fk, : nh * fj, : nw * fi].reshape(nd, fk, nh, fj, nw, fi).mean(axis=(1, 3, 5))
        labels = None
        if self.labels is not None:
            labels = self.labels[: nd * fk, : nh * fj, : nw * fi].reshape(nd, fk, nh, fj, nw, fi).max(axis=(1, 3, 5))
        S = np.diag([fi, fj, fk, 1.0])
        S[:3, 3] = [(fi - 1) / 2, (fj - 1) / 2, (fk - 1) / 2]
        return replace(self, hu=hu.astype(np.float32), T_ct_from_ijk=self.T_ct_from_ijk @ S, labels=labels)


def read_label_table(csv_path) -> dict:
    """Label names to ids from a TotalSegmentator-style CSV with columns ``structure,id``."""
    table = {}
    try:
        with open(csv_path, newline="") as f:
            for row in csv.DictReader(f):
                table[row["structure"].strip()] = int(row["id"])
    except (OSError, KeyError, ValueError) as exc:
        raise CTLoadError(f"cannot read label table {csv_path}: {exc}") from None
    return table


def resolve_label(name_or_id, label_names: dict) -> int:
    """Label id from an id, a full name (``vertebrae_T8``) or a vertebra short name (``T8``)."""
    if isinstance(name_or_id, (int, np.integer)):
        return int(name_or_id)
    s = str(name_or_id).strip()
    if s.isdigit():
        return int(s)
    for key in (s, f"vertebrae_{s}", f"vertebrae_{s.upper()}"):
        if key in label_names:
            return label_names[key]
    raise ConfigError(f"unknown structure {s!r}; known names include {sorted(label_names)[:8]} ...")


def load_ct(path, labels_path=None, label_table=None) -> CTVolume:
    """Load a CT (NIfTI, NRRD, MHA or a DICOM folder) in its physical frame.

    Parameters
    ----------
    path : str or Path
        CT file or DICOM series folder. Values are taken as Hounsfield units.
    labels_path : str or Path, optional
        Label map (e.g. TotalSegmentator). Resampled onto the CT grid (nearest neighbour) if its
        grid differs.
    label_table : str or Path, optional
        CSV with ``structure,id`` columns naming the labels.

    Raises
    ------
    CTLoadError
        Missing, unreadable, non-3-D or non-scalar input.
    """
    import SimpleITK as sitk

    path = Path(os.path.expanduser(str(path)))
    image = _read_sitk(path, "CT")
    hu = sitk.GetArrayFromImage(image).astype(np.float32)
    T = _affine_from_sitk(image)
    labels = None
    if labels_path is not None:
        lab_path = Path(os.path.expanduser(str(labels_path)))
        lab = _read_sitk(lab_path, "label map")
        same = lab.GetSize() == image.GetSize() and np.allclose(_affine_from_sitk(lab), T, atol=1e-3)
        if not same:
            log.info("resampling label map %s onto the CT grid (nearest neighbour)", lab_path)
            lab = sitk.Resample(lab, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, lab.GetPixelID())
        labels = sitk.GetArrayFromImage(lab)
        if not np.issubdtype(labels.dtype, np.integer):
            labels = np.rint(labels).astype(np.int32)
    names = read_label_table(label_table) if label_table is not None else {}
    return CTVolume(hu=hu, T_ct_from_ijk=T, labels=labels, source=str(path), label_names=names)
