"""CT volumes in the physical LPS frame (conventions: :mod:`reg2d3d_ros.geometry`).

A :class:`CTVolume` keeps the voxel array in ``(D, H, W) = (k, j, i)`` order and the affine
``T_ct_from_ijk`` (mm) that SimpleITK's ``TransformIndexToPhysicalPoint`` implements:
``p = origin + direction @ (spacing * ijk)``. Crops and binning update that affine so that
every voxel keeps its physical position; nothing is ever re-centred.
"""

from __future__ import annotations

import csv
import difflib
import logging
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..errors import CTLoadError, ConfigError
from .totalseg import ALIASES, LABEL_SETS, names_to_ids, short_name

log = logging.getLogger(__name__)

#: ``label_set`` values :func:`load_ct` accepts: ``auto`` or a built-in table (:data:`.totalseg.LABEL_SETS`).
LABEL_SET_CHOICES = ("auto",) + tuple(LABEL_SETS)

#: A label map is on the CT's grid when every corner voxel centre of the two grids lies within
#: this fraction of the CT's smallest voxel spacing (same size required).
GRID_TOLERANCE_VOXELS = 0.1

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
        raise CTLoadError(
            f"cannot read {what} {path}: not a readable volume (NIfTI, NRRD, MHA or a DICOM folder): {_sitk_reason(exc)}"
        ) from None
    if image.GetDimension() != 3:
        raise CTLoadError(f"{what} {path} is a {image.GetDimension()}-D image, not a volume: a 3-D volume is required")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise CTLoadError(f"{what} {path} is not a 3-D volume of one value per voxel: it has {image.GetNumberOfComponentsPerPixel()} "
                          "components per voxel (a 4-D series, a vector or a colour image); a 3-D volume is required")
    if min(image.GetSize()) < 2:
        raise CTLoadError(f"{what} {path} has {_size_text(image.GetSize())} voxels, not a volume: "
                          "need at least 2 voxels along every axis (a 3-D volume is required)")
    return image


def _sitk_reason(exc: Exception) -> str:
    """The reason in a SimpleITK/ITK error message, without source file paths, line numbers and object addresses."""
    text = str(exc)
    m = re.search(r"ERROR:\s*(.*)", text, re.S)
    body = m.group(1) if m else text
    body = re.sub(r"\S+\.(?:cxx|cpp|cc|hxx|txx|h):\d+:?", "", body)  # ITK's source locations
    body = re.sub(r"\b\w+\(0x[0-9a-fA-F]+\):\s*", "", body)  # ITK objects' addresses
    lines = [ln.strip() for ln in body.splitlines() if ln.strip()]
    detail = [re.sub(r"^\[\w+\]\s*(?:\w+:\s*)?", "", ln) for ln in lines if ln.startswith("[")]  # e.g. NRRD's call chain
    lines = [ln for ln in lines if not ln.startswith("[")] + detail[-1:]
    if lines:
        lines[0] = re.sub(r"^[A-Z]\w+:\s+(?=\S)", "", lines[0])  # the ITK method's name
    reason = " ".join(lines).strip().rstrip(".:")
    if "Unable to determine ImageIO reader" in reason:
        return "the file format was not recognised"
    return reason or "SimpleITK could not read it"


def _size_text(size) -> str:
    return "x".join(str(int(n)) for n in size)


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
    label_names : dict
        ``{name: id}`` of the labels (a :class:`LabelTable`: a CSV or a built-in TotalSegmentator table).
    labels_source : str
        Where the label map came from (for messages; '' for none or unknown).
    notes : list of str
        What loading decided on the way (which label names, a resampled label map), for the log.
    """

    hu: np.ndarray
    T_ct_from_ijk: np.ndarray
    labels: np.ndarray | None = None
    source: str = ""
    label_names: dict = field(default_factory=dict)
    labels_source: str = ""
    notes: list = field(default_factory=list)

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
            raise ConfigError(self._no_voxels_message(label_ids))
        if max_points is not None and len(kji) > max_points:
            idx = np.random.default_rng(seed).choice(len(kji), size=max_points, replace=False)
            kji = kji[np.sort(idx)]
        return self.ijk_to_ct(kji[:, ::-1].astype(np.float64))

    # -- structures -----------------------------------------------------------------------
    def describe_label(self, label_id: int, asked=None) -> str:
        """A label for messages: ``structure 'L3' (vertebrae_L3, id 29)``, or ``label id 7 (...)`` if unnamed.

        Parameters
        ----------
        label_id : int
            The label id.
        asked : str or int, optional
            How the user named it (``"L3"``, ``"vertebrae_L3"``, ``29``); default: its short name.
        """
        names = [n for n, i in self.label_names.items() if i == int(label_id)]
        if not names:
            table = getattr(self.label_names, "source", "") or "the label table"
            return f"label id {int(label_id)} (not named in {table})"
        name = names[0]
        shown = short_name(name) if asked is None or str(asked).strip().isdigit() else str(asked).strip()
        return f"structure '{shown}' ({name}, id {int(label_id)})" if shown != name else f"structure '{name}' (id {int(label_id)})"

    def structure_id(self, name_or_id) -> int:
        """Label id of a structure (a name, a vertebra's short name or an id) that has voxels in the label map.

        Raises
        ------
        ConfigError
            Unknown name, no label map, or a structure without voxels (the message names the
            structure, the label map and the vertebrae it does hold).
        """
        lid = resolve_label(name_or_id, self.label_names)
        if self.labels is None:
            raise ConfigError(f"CT {self.source} has no label map; pass one to select structures")
        if not np.any(self.labels == lid):
            raise ConfigError(self._no_voxels_message([lid], asked=name_or_id))
        return lid

    def _no_voxels_message(self, label_ids, asked=None) -> str:
        ids = [int(i) for i in np.atleast_1d(np.asarray(label_ids))]
        what = self.describe_label(ids[0], asked) + " has" if len(ids) == 1 else f"labels {ids} have"
        where = self.labels_source or f"the label map of CT {self.source}"
        return f"{what} no voxels in {where}{self._present_hint()}"

    def _present_hint(self) -> str:
        """``' (its vertebrae: T1, ..., L1)'``: what the label map holds, for a message."""
        if self.labels is None:
            return ""
        lab = self.labels
        present = np.flatnonzero(np.bincount(lab.ravel().astype(np.int64) - min(int(lab.min()), 0)))
        present = [int(i) + min(int(lab.min()), 0) for i in present]
        by_id = {i: n for n, i in self.label_names.items()}
        order = {v: k for k, v in enumerate(ALIASES.values())}
        verts = sorted((by_id[i] for i in present if by_id.get(i) in order), key=order.get)
        if verts:
            return f" (its vertebrae: {', '.join(short_name(v) for v in verts)})"
        others = [i for i in present if i != 0]
        if not others:
            return " (it holds no labels at all)"
        return f" (it holds no vertebrae; label ids present: {others[:20]}{' ...' if len(others) > 20 else ''})"

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
            raise ConfigError(self._no_voxels_message(label_ids))
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


class LabelTable(dict):
    """``{name: id}`` of a label map's structures, with where the names came from (``source``, for messages)."""

    def __init__(self, items=(), source: str = ""):
        super().__init__(items)
        self.source = source


def read_label_table(csv_path) -> LabelTable:
    """Label names to ids from a TotalSegmentator-style CSV with columns ``structure,id``."""
    table = LabelTable(source=f"label table {csv_path}")
    try:
        with open(csv_path, newline="") as f:
            for row in csv.DictReader(f):
                table[row["structure"].strip()] = int(row["id"])
    except (OSError, KeyError, ValueError) as exc:
        raise CTLoadError(f"cannot read label table {csv_path}: {exc}") from None
    return table


def builtin_label_table(label_set: str) -> LabelTable:
    """The built-in names of ``label_set`` (``totalseg_v2`` or ``totalseg_v1``, :mod:`.totalseg`)."""
    if label_set not in LABEL_SETS:
        raise ConfigError(f"label set must be one of {', '.join(LABEL_SET_CHOICES)}, got {label_set!r}")
    return LabelTable(names_to_ids(label_set), source=LABEL_SETS[label_set][1])


def resolve_label(name_or_id, label_names: dict) -> int:
    """Label id from an id, a full name (``vertebrae_T8``) or a vertebra short name (``T8``).

    Raises
    ------
    ConfigError
        An unknown name; the message says which table was searched and what it accepts.
    """
    if isinstance(name_or_id, (int, np.integer)) and not isinstance(name_or_id, bool):
        return int(name_or_id)
    s = str(name_or_id).strip()
    if s.isdigit():
        return int(s)
    for key in (s, f"vertebrae_{s}", f"vertebrae_{s.upper()}"):
        if key in label_names:
            return label_names[key]
    lower = {k.lower(): v for k, v in label_names.items()}
    if s.lower() in lower:
        return lower[s.lower()]
    source = getattr(label_names, "source", "") or "the label table"
    if not label_names:
        raise ConfigError(f"unknown structure {s!r}: {source} names no structures; give the label id instead, or a label table "
                          "that names it (columns structure,id)")
    known = [k for k in label_names] + [a for a, full in ALIASES.items() if full in label_names]
    close = difflib.get_close_matches(s, known, n=3, cutoff=0.6)
    verts = [a for a, full in ALIASES.items() if full in label_names]
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    accepts = (f"a vertebra's short name ({verts[0]}..{verts[-1]}), " if verts else "") + "a structure name of the table or a label id"
    raise ConfigError(f"unknown structure {s!r} in {source}: give {accepts}{hint}")


def add_ct_arguments(ap) -> None:
    """Add a command's ``--ct``, ``--labels`` and ``--label-table`` options (all of :func:`add_label_arguments` too)."""
    ap.add_argument("--ct", required=True, help="CT file (NIfTI, NRRD, MHA) or DICOM folder")
    ap.add_argument("--labels", required=True, help="label map of the CT (TotalSegmentator-style)")
    ap.add_argument("--label-table", default=None, help="CSV of label names, columns structure,id (default: TotalSegmentator's names, "
                    "built in: --label-set)")
    add_label_arguments(ap)


def add_label_arguments(ap) -> None:
    """Add a command's ``--label-set`` and ``--resample-labels`` options (:func:`load_ct`'s ``label_set``, ``resample_labels``)."""
    ap.add_argument("--label-set", choices=LABEL_SET_CHOICES, default="auto",
                    help="label ids of the built-in names used without --label-table: totalseg_v2 (TotalSegmentator v2, task total) "
                         "or totalseg_v1; auto: the version the label map shows, else v2 (default)")
    ap.add_argument("--resample-labels", action="store_true",
                    help="resample a label map on another grid than the CT onto the CT grid (nearest neighbour) instead of stopping")


def _grid_of(image) -> tuple:
    return (tuple(int(n) for n in image.GetSize()), _affine_from_sitk(image))


def _grid_text(size, T) -> str:
    spacing = np.linalg.norm(T[:3, :3], axis=0)
    direction = T[:3, :3] / spacing
    text = (f"{_size_text(size)} voxels of {'x'.join(f'{v:g}' for v in np.round(spacing, 4))} mm, "
            f"origin ({', '.join(f'{v:.1f}' for v in T[:3, 3])}) mm")
    if not np.allclose(direction, np.eye(3), atol=1e-6):
        text += f", direction ({', '.join(f'{v:.3f}' for v in direction.ravel())})"
    return text


def _corner_centres(size, T) -> np.ndarray:
    c = np.array([[i, j, k] for i in (0, size[0] - 1) for j in (0, size[1] - 1) for k in (0, size[2] - 1)], dtype=np.float64)
    return c @ T[:3, :3].T + T[:3, 3]


def grid_mismatch(labels_grid: tuple, ct_grid: tuple) -> str | None:
    """Why a label map's grid is not the CT's, or ``None`` if it is (within :data:`GRID_TOLERANCE_VOXELS`).

    Parameters
    ----------
    labels_grid, ct_grid : tuple
        ``(size (i, j, k), T_ct_from_ijk (4, 4) mm)`` of each image.
    """
    (size_l, T_l), (size_c, T_c) = labels_grid, ct_grid
    tol_mm = GRID_TOLERANCE_VOXELS * float(np.linalg.norm(T_c[:3, :3], axis=0).min())
    centre_l = _corner_centres(size_l, T_l).mean(axis=0)
    centre_c = _corner_centres(size_c, T_c).mean(axis=0)
    if size_l == size_c:
        dist = float(np.linalg.norm(_corner_centres(size_l, T_l) - _corner_centres(size_c, T_c), axis=1).max())
        if dist <= tol_mm:
            return None
        how = f"the same voxel lies up to {dist:.1f} mm apart in the two"
    else:
        how = f"their centres lie {np.linalg.norm(centre_l - centre_c):.1f} mm apart"
    return f"label map {_grid_text(size_l, T_l)}; CT {_grid_text(size_c, T_c)} ({how})"


# -- which TotalSegmentator version wrote a label map --------------------------------------------
def _vertebra_problems(labels: np.ndarray, T: np.ndarray, id_to_name: dict, counts: np.ndarray, objects: list) -> list:
    """What contradicts reading ``labels`` with ``id_to_name``: labels named vertebrae that cannot be vertebrae.

    A vertebra is at most 250 cm^3 and 150 mm across (1st-99th percentile of its voxels), and of
    two neighbouring vertebrae the cranial one lies higher (LPS +z is superior), 8-80 mm away.
    """
    voxel_cm3 = abs(float(np.linalg.det(T[:3, :3]))) / 1000.0
    order = {full: k for k, full in enumerate(ALIASES.values())}  # C1 (0) ... S1 (24): cranial to caudal
    centres = {}
    problems = []
    for lid, name in id_to_name.items():
        if name not in order or lid >= len(counts) or counts[lid] == 0:
            continue
        if counts[lid] * voxel_cm3 > 250.0:
            problems.append(f"{lid} ({name}) holds {counts[lid] * voxel_cm3:.0f} cm^3")
            continue
        sl = objects[lid - 1]
        kji = np.argwhere(labels[sl] == lid) + np.array([s.start for s in sl])
        pts = kji[:, ::-1].astype(np.float64) @ T[:3, :3].T + T[:3, 3]
        lo, hi = np.percentile(pts, [1, 99], axis=0)
        if np.max(hi - lo) > 150.0:
            problems.append(f"{lid} ({name}) spans {np.max(hi - lo):.0f} mm")
            continue
        centres[order[name]] = (lid, name, np.median(pts, axis=0))
    for k in sorted(centres):
        if k + 1 in centres:
            (li, ni, ci), (lj, nj, cj) = centres[k], centres[k + 1]
            d = float(np.linalg.norm(ci - cj))
            if not (ci[2] > cj[2] and 8.0 <= d <= 80.0):
                problems.append(f"{li} ({ni}) and {lj} ({nj}) are not neighbouring vertebrae ({d:.0f} mm apart)")
    return problems


def detect_label_set(labels: np.ndarray, T_ct_from_ijk: np.ndarray) -> tuple:
    """Which TotalSegmentator version numbered a label map, if the map tells.

    Ids above 104 exist in v2 only. Otherwise each version's vertebra ids are checked
    (:func:`_vertebra_problems`): v1 numbers the vertebrae 18-41 where v2 has bowel, bladder and
    the lower vertebrae, and v2 numbers them 25-50 where v1 has the upper vertebrae, oesophagus,
    trachea, heart and brain, so organs read as vertebrae under the wrong version.

    Returns
    -------
    tuple
        ``(label_set or None, reason)``: ``None`` when the map fits both versions (or neither).
    """
    from scipy import ndimage

    lab = np.asarray(labels)
    if lab.size == 0 or int(lab.min()) < 0:
        return None, "the label map has negative ids"
    top = int(lab.max())
    if top > max(LABEL_SETS["totalseg_v1"][0]):
        return "totalseg_v2", f"the label map has ids up to {top} (v1 has {max(LABEL_SETS['totalseg_v1'][0])} classes)"
    lab = lab.astype(np.int32, copy=False)
    counts = np.bincount(lab.ravel(), minlength=top + 1)
    objects = ndimage.find_objects(lab)
    problems = {ls: _vertebra_problems(lab, T_ct_from_ijk, LABEL_SETS[ls][0], counts, objects) for ls in LABEL_SETS}
    fits = [ls for ls, p in problems.items() if not p]
    if len(fits) == 1:
        other = next(ls for ls in LABEL_SETS if ls != fits[0])
        return fits[0], f"its vertebra labels fit {fits[0]} only (read as {other}: {problems[other][0]})"
    return None, ("the label map does not tell v1 from v2" if fits else
                  "the label map fits neither v1 nor v2 (" + "; ".join(f"{ls}: {p[0]}" for ls, p in problems.items()) + ")")


def choose_label_set(label_set: str, labels: np.ndarray | None, T_ct_from_ijk: np.ndarray) -> tuple:
    """``(built-in label set, why)`` for ``label_set`` (``auto``, ``totalseg_v2``, ``totalseg_v1``) and a label map.

    ``auto`` takes the version :func:`detect_label_set` finds, else v2. An explicit v1 for a map
    with ids beyond v1's classes is an error.
    """
    if label_set not in LABEL_SET_CHOICES:
        raise ConfigError(f"label set must be one of {', '.join(LABEL_SET_CHOICES)}, got {label_set!r}")
    if labels is None:
        return ("totalseg_v2" if label_set == "auto" else label_set), ""
    if label_set == "totalseg_v1":
        top = int(np.max(labels)) if np.size(labels) else 0
        if top > max(LABEL_SETS["totalseg_v1"][0]):
            raise ConfigError(f"label set totalseg_v1 was asked for, but the label map has ids up to {top} and TotalSegmentator v1 "
                              f"has {max(LABEL_SETS['totalseg_v1'][0])} classes: is it a v2 map (label set totalseg_v2)?")
    if label_set != "auto":
        return label_set, ", as asked"
    found, why = detect_label_set(labels, T_ct_from_ijk)
    if found is not None:
        return found, f", detected: {why}"
    return "totalseg_v2", f", the default: {why} (for a v1 map, set the label set to totalseg_v1)"


def load_ct(path, labels_path=None, label_table=None, *, label_set: str = "auto", resample_labels: bool = False) -> CTVolume:
    """Load a CT (NIfTI, NRRD, MHA or a DICOM folder) in its physical frame.

    Parameters
    ----------
    path : str or Path
        CT file or DICOM series folder. Values are taken as Hounsfield units.
    labels_path : str or Path, optional
        Label map (e.g. TotalSegmentator). It must share the CT's grid (size, spacing, origin,
        direction; :func:`grid_mismatch`), unless ``resample_labels``.
    label_table : str or Path, optional
        CSV with ``structure,id`` columns naming the labels; default: TotalSegmentator's names,
        built in (``label_set``).
    label_set : str, optional
        Built-in names used without ``label_table``: ``totalseg_v2``, ``totalseg_v1`` or ``auto``
        (the version the label map shows, :func:`detect_label_set`, else v2). Default: ``auto``.
    resample_labels : bool, optional
        Resample a label map on another grid onto the CT's (nearest neighbour; noted in
        ``notes`` and the log) instead of raising.

    Raises
    ------
    CTLoadError
        Missing, unreadable, non-3-D or non-scalar input.
    ConfigError
        A label map on another grid (without ``resample_labels``), an unknown label set.
    """
    import SimpleITK as sitk

    if label_set not in LABEL_SET_CHOICES:
        raise ConfigError(f"label set must be one of {', '.join(LABEL_SET_CHOICES)}, got {label_set!r}")
    path = Path(os.path.expanduser(str(path)))
    image = _read_sitk(path, "CT")
    hu = sitk.GetArrayFromImage(image).astype(np.float32)
    T = _affine_from_sitk(image)
    labels = None
    notes = []
    lab_path = None
    if labels_path is not None:
        lab_path = Path(os.path.expanduser(str(labels_path)))
        lab = _read_sitk(lab_path, "label map")
        mismatch = grid_mismatch(_grid_of(lab), _grid_of(image))
        if mismatch is not None:
            if not resample_labels:
                raise ConfigError(
                    f"the label map {lab_path} is not on the grid of the CT {path}: {mismatch}. A label map must share the CT's "
                    "grid (size, spacing, origin, direction), as TotalSegmentator writes it; was it made from another CT or "
                    "another series? To resample it onto the CT grid (nearest neighbour) anyway, pass --resample-labels "
                    "(node: resample_labels:=true)")
            note = f"label map {lab_path} resampled onto the CT grid (nearest neighbour, resample_labels): {mismatch}"
            log.warning(note)
            notes.append(note)
            lab = sitk.Resample(lab, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, lab.GetPixelID())
        labels = sitk.GetArrayFromImage(lab)
        if not np.issubdtype(labels.dtype, np.integer):
            labels = np.rint(labels).astype(np.int32)
    if label_table is not None:
        names = read_label_table(label_table)
    else:
        chosen, why = choose_label_set(label_set, labels, T)
        names = builtin_label_table(chosen)
        if labels is not None:
            note = f"label names of {lab_path}: {names.source}{why}"
            log.info(note)
            notes.append(note)
    return CTVolume(hu=hu, T_ct_from_ijk=T, labels=labels, source=str(path), label_names=names,
                    labels_source="" if lab_path is None else str(lab_path), notes=notes)
