"""What a model folder was made from, and the check that it fits the CT and target being loaded.

``python -m reg2d3d_ros.prepare`` records a *provenance* in everything it writes (``scr.json``,
the metadata of ``scr.pt``, ``surface_<target>.npz``, the baseline's ``posenet.pt``):

``ct``
    the CT's path as given, the SHA-256 of its content (the file's bytes; for a DICOM folder,
    of every file in it, in name order), its size (voxels) and spacing (mm);
``labels``
    the same for the label map, and where the label names came from;
``target``
    the target as asked (``L3``), its label name (``vertebrae_L3``) and id (29);
``geometry``
    the C-arm the network was trained for: source-to-detector distance and detector width (mm),
    network input size (pixels).

:func:`check_models_provenance` compares a model folder's provenance with the CT, label map and
target being loaded and raises :class:`~reg2d3d_ros.errors.ModelLoadError` (one line naming
what differs) when the folder was made for another CT, label map or target: the node then stays
in ``waiting_for_ct`` with that line on ``/diagnostics``. A folder without a provenance (made
before it was recorded) is accepted with a warning in the log. The geometry is recorded, not
checked: the frames' camera is only known when they arrive.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from .errors import ModelLoadError

log = logging.getLogger("reg2d3d_ros.provenance")

#: Version of the provenance record.
PROVENANCE_VERSION = 1


def content_sha256(path) -> str:
    """SHA-256 (hex) of a file's bytes, or of a folder's files (relative names and bytes, in name order).

    Parameters
    ----------
    path : str or Path
        A file (CT, label map) or a folder (a DICOM series).

    Returns
    -------
    str
        64 hex digits.

    Raises
    ------
    ModelLoadError
        The path does not exist or cannot be read.
    """
    p = Path(os.path.expanduser(str(path)))
    h = hashlib.sha256()
    try:
        if p.is_dir():
            for f in sorted(q for q in p.rglob("*") if q.is_file()):
                h.update(str(f.relative_to(p)).encode() + b"\0")
                _update_with_file(h, f)
        else:
            _update_with_file(h, p)
    except OSError as exc:
        raise ModelLoadError(f"cannot read {p} to check what the models were made from: {exc.strerror or exc}") from None
    return h.hexdigest()


def _update_with_file(h, path: Path) -> None:
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)


def target_record(ct, target) -> dict:
    """``{"asked", "name", "id"}`` of a target in a loaded CT's label names (``ct.structure_id`` checks it)."""
    lid = int(ct.structure_id(target))
    names = [n for n, i in ct.label_names.items() if int(i) == lid]
    return {"asked": str(target), "name": names[0] if names else "", "id": lid}


def make_provenance(ct, target, sdd_mm: float, detector_mm: float, size: int) -> dict:
    """The provenance record of a model made from a loaded CT (with its label map) for one target.

    Parameters
    ----------
    ct : CTVolume
        The CT as :func:`reg2d3d_ros.volume.load_ct` loaded it (``source`` and ``labels_source``
        are the files that are hashed).
    target : str or int
        The target as the user named it.
    sdd_mm, detector_mm : float
        Source-to-detector distance and detector width of the C-arm the model is made for, mm.
    size : int
        Network input size, pixels.

    Returns
    -------
    dict
        JSON-serialisable record (see the module docstring).
    """
    import numpy as np

    from . import __version__

    rec = data_provenance(ct, target)
    rec["ct"].update(size=[int(n) for n in ct.shape_ijk], spacing_mm=[round(float(s), 6) for s in np.asarray(ct.spacing_mm)])
    rec["labels"]["names"] = getattr(ct.label_names, "source", "")
    return {"version": PROVENANCE_VERSION, "software": f"reg2d3d_ros {__version__}", **rec,
            "geometry": {"sdd_mm": float(sdd_mm), "detector_mm": float(detector_mm), "size": int(size)}}


def read_models_provenance(models_dir) -> tuple:
    """``(provenance or None, file it came from or None)`` of a model folder's SCR model.

    The metadata of ``scr.pt`` (what the node loads) is read first, then ``scr.json``. A folder
    without either file (e.g. one holding only generic networks) gives ``(None, None)``.

    Raises
    ------
    ModelLoadError
        The file exists but cannot be read.
    """
    d = Path(models_dir)
    pt, js = d / "scr.pt", d / "scr.json"
    if pt.is_file():
        import torch

        try:
            blob = torch.load(pt, map_location="cpu", weights_only=True)
            meta = json.loads(blob.get("meta_json", "{}")) if isinstance(blob, dict) else {}
        except Exception as exc:  # a corrupt file: the model check names it too
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(f"model file {str(pt)!r} is corrupt or incompatible: {first}") from None
        if isinstance(meta, dict) and meta.get("provenance"):
            return meta["provenance"], pt
    if js.is_file():
        try:
            meta = json.loads(js.read_text())
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{js} cannot be read ({type(exc).__name__}: {str(exc)[:200]}); re-create the folder with "
                                 "python -m reg2d3d_ros.prepare") from None
        if isinstance(meta, dict) and meta.get("provenance"):
            return meta["provenance"], js
    return None, (pt if pt.is_file() else js if js.is_file() else None)


def _short(sha: str) -> str:
    return (sha or "?")[:12]


def provenance_differences(made: dict, here: dict) -> list:
    """What differs between the provenance a model was made from and the one of the data at hand.

    Parameters
    ----------
    made, here : dict
        Provenance records (:func:`make_provenance`); ``here`` needs ``ct``, ``labels`` and
        ``target`` only. A label map hash missing on either side is not compared; the geometry
        is compared only when both have one.

    Returns
    -------
    list of str
        One phrase per difference (``CT a.nii.gz (sha256 ...), not b.nii.gz (sha256 ...)``); empty
        when they agree.
    """
    diffs = []
    a, b = made.get("ct", {}), here.get("ct", {})
    if a.get("sha256") != b.get("sha256"):
        diffs.append(f"CT {a.get('path', '?')} (sha256 {_short(a.get('sha256'))}), not {b.get('path', '?')} (sha256 {_short(b.get('sha256'))})")
    a, b = made.get("labels", {}), here.get("labels", {})
    if a.get("sha256") and b.get("sha256") and a["sha256"] != b["sha256"]:
        diffs.append(f"label map {a.get('path', '?')} (sha256 {_short(a['sha256'])}), not {b.get('path', '?')} (sha256 {_short(b['sha256'])})")
    a, b = made.get("target", {}), here.get("target", {})
    if a.get("id") != b.get("id"):
        diffs.append(f"target {a.get('asked', '?')} ({a.get('name') or 'unnamed'}, id {a.get('id')}), not "
                     f"{b.get('asked', '?')} ({b.get('name') or 'unnamed'}, id {b.get('id')})")
    a, b = made.get("geometry"), here.get("geometry")
    if isinstance(a, dict) and isinstance(b, dict):
        keys = [k for k in ("sdd_mm", "detector_mm", "size") if a.get(k) != b.get(k)]
        if keys:
            diffs.append("C-arm geometry " + ", ".join(f"{k} {a.get(k)}" for k in keys) + ", not " + ", ".join(f"{k} {b.get(k)}" for k in keys))
    return diffs


def data_provenance(ct, target) -> dict:
    """The part of a provenance record that a loaded CT, its label map and a target give (no geometry)."""
    return {"ct": {"path": str(ct.source), "sha256": content_sha256(ct.source)},
            "labels": {"path": str(ct.labels_source), "sha256": content_sha256(ct.labels_source) if ct.labels_source else ""},
            "target": target_record(ct, target)}


def check_models_provenance(models_dir, ct, target) -> dict | None:
    """Check that a model folder was made for this CT, label map and target.

    Parameters
    ----------
    models_dir : str or Path
        The node's ``models_dir`` ('' for none: nothing to check).
    ct : CTVolume
        The loaded CT with its label map.
    target : str or int
        The target as configured (``L3``, ``vertebrae_L3``, ``29``).

    Returns
    -------
    dict or None
        The folder's provenance, or None when there is nothing to check (no folder, no SCR model,
        or a model without a provenance: then a warning is logged).

    Raises
    ------
    ModelLoadError
        One line naming what differs (CT content, label map content, target) and what to do.
    """
    if not models_dir or not Path(models_dir).is_dir():
        return None
    prov, where = read_models_provenance(models_dir)
    if prov is None:
        if where is not None:
            log.warning(f"models folder {models_dir} does not record what it was made from (made before provenance was recorded): "
                        "cannot check that it was made for this CT and target; re-create it with python -m reg2d3d_ros.prepare to check it")
        return None
    if not isinstance(prov, dict) or not all(isinstance(prov.get(k), dict) for k in ("ct", "labels", "target")):
        raise ModelLoadError(f"{where}: its provenance record is malformed; re-create the folder with python -m reg2d3d_ros.prepare")
    here = data_provenance(ct, target)
    diffs = provenance_differences(prov, here)
    if diffs:
        raise ModelLoadError(f"models folder {models_dir} was made for {'; '.join(diffs)}: prepare one for this CT and target "
                             f"(python -m reg2d3d_ros.prepare --ct CT --labels LABELS --target {here['target']['asked']} --out DIR) "
                             "or leave models_dir empty")
    return prov
