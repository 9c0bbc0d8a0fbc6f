"""Fixtures shared by several test files."""

from __future__ import annotations

import pytest


def resample_isotropic(ct_path, labels_path, out_dir, spacing_mm: float):
    """Write ``ct.nii.gz`` and ``labels.nii.gz``: a CT and its label map resampled to isotropic voxels.

    The CT is smoothed first (a Gaussian whose FWHM makes up the difference between the voxel
    sizes, as a coarser reconstruction would be) and interpolated linearly; the label map takes
    the nearest label. The physical extent (the outer voxel faces) is kept.

    Returns
    -------
    dict
        ``{"ct": Path, "labels": Path}``.
    """
    import numpy as np
    import SimpleITK as sitk

    ct, lab = sitk.ReadImage(str(ct_path)), sitk.ReadImage(str(labels_path))
    size = [int(round(n * s / spacing_mm)) for n, s in zip(ct.GetSize(), ct.GetSpacing())]
    variance = [max(0.0, spacing_mm**2 - s**2) / 2.355**2 for s in ct.GetSpacing()]  # mm^2
    smooth = sitk.DiscreteGaussian(ct, variance, 32, 0.01, True)
    ref = sitk.Image(size, ct.GetPixelID())
    ref.SetSpacing([spacing_mm] * 3)
    ref.SetDirection(ct.GetDirection())
    corner = np.array(ct.TransformContinuousIndexToPhysicalPoint([-0.5] * 3))
    ref.SetOrigin(tuple(corner + np.array(ct.GetDirection()).reshape(3, 3) @ np.full(3, spacing_mm / 2)))
    out = {"ct": out_dir / "ct.nii.gz", "labels": out_dir / "labels.nii.gz"}
    sitk.WriteImage(sitk.Resample(smooth, ref, sitk.Transform(), sitk.sitkLinear, -1024.0, ct.GetPixelID()), str(out["ct"]))
    sitk.WriteImage(sitk.Resample(lab, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, lab.GetPixelID()), str(out["labels"]))
    return out


@pytest.fixture(scope="session")
def ct_3mm(tmp_path_factory):
    """The example CT and its labels resampled to 3 mm isotropic voxels (an abdominal series' resolution; L3 is in it)."""
    from reg2d3d_ros.example import example_paths

    ex = example_paths()
    return resample_isotropic(ex.ct, ex.labels, tmp_path_factory.mktemp("ct_3mm"), 3.0)
