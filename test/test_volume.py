"""CT loading in the physical frame, attenuation, masks, crops, binning and clear errors."""

import numpy as np
import pytest
import SimpleITK as sitk

from reg2d3d_ros.errors import ConfigError, CTLoadError
from reg2d3d_ros.volume import MU_WATER_PER_MM, CTVolume, load_ct, read_label_table, resolve_label


def make_image(shape_kji=(12, 14, 16), seed=0):
    rng = np.random.default_rng(seed)
    arr = rng.normal(0, 300, size=shape_kji).astype(np.int16)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.7, 0.8, 2.5))
    img.SetOrigin((-100.0, 50.0, 20.0))
    # an oblique, right-handed direction
    a = np.deg2rad(20)
    d = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]) @ np.diag([1.0, -1.0, -1.0])
    img.SetDirection(d.flatten().tolist())
    return img, arr


def test_physical_frame_matches_simpleitk(tmp_path):
    img, arr = make_image()
    path = tmp_path / "ct.nrrd"
    sitk.WriteImage(img, str(path))
    ct = load_ct(path)
    assert ct.hu.shape == arr.shape
    assert np.array_equal(ct.hu, arr.astype(np.float32))
    rng = np.random.default_rng(3)
    for _ in range(20):
        ijk = [int(rng.integers(0, n)) for n in ct.shape_ijk]
        expected = img.TransformIndexToPhysicalPoint(ijk)
        assert np.allclose(ct.ijk_to_ct(np.array([ijk]))[0], expected, atol=1e-9)
        cont = rng.uniform(0, 10, size=3)
        assert np.allclose(ct.ijk_to_ct(cont[None])[0], img.TransformContinuousIndexToPhysicalPoint(cont.tolist()), atol=1e-9)
    assert np.allclose(ct.ct_to_ijk(ct.ijk_to_ct(np.eye(3) * 5)), np.eye(3) * 5)
    assert np.allclose(ct.spacing_mm, [0.7, 0.8, 2.5])


@pytest.mark.parametrize("suffix", [".nii.gz", ".mha"])
def test_other_formats_load(tmp_path, suffix):
    img, arr = make_image(seed=1)
    path = tmp_path / f"ct{suffix}"
    sitk.WriteImage(img, str(path))
    ct = load_ct(path)
    assert np.array_equal(ct.hu, arr.astype(np.float32))
    assert np.allclose(ct.ijk_to_ct(np.zeros((1, 3)))[0], img.GetOrigin(), atol=1e-4)


def test_dicom_series_folder(tmp_path):
    img, arr = make_image(shape_kji=(5, 16, 16), seed=2)
    img.SetDirection(np.eye(3).flatten().tolist())
    folder = tmp_path / "dicom"
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series_uid = "1.2.826.0.1.3680043.2.1125.1.1234567"
    for k in range(img.GetDepth()):
        sl = img[:, :, k]
        pos = img.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, value in [
            ("0008|0060", "CT"),
            ("0020|000e", series_uid),
            ("0020|0013", str(k + 1)),
            ("0020|0032", "\\".join(f"{x:.6f}" for x in pos)),
            ("0020|0037", "1\\0\\0\\0\\1\\0"),
            ("0028|0030", "0.8\\0.7"),
            ("0018|0050", "2.5"),
        ]:
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(sl)
    ct = load_ct(folder)
    assert ct.hu.shape == arr.shape
    assert np.allclose(ct.hu, arr.astype(np.float32))
    assert np.allclose(ct.spacing_mm, [0.7, 0.8, 2.5], atol=1e-4)
    assert np.allclose(ct.ijk_to_ct(np.array([[0, 0, 4]]))[0], img.TransformIndexToPhysicalPoint((0, 0, 4)), atol=1e-3)


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(CTLoadError, match="does not exist"):
        load_ct(tmp_path / "missing.nii.gz")
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"this is not a volume" * 10)
    with pytest.raises(CTLoadError, match="cannot read CT"):
        load_ct(bad)
    flat = tmp_path / "flat.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8), np.int16)), str(flat))
    with pytest.raises(CTLoadError, match="3-D volume is required"):
        load_ct(flat)
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(CTLoadError, match="no DICOM series"):
        load_ct(empty)
    vec = tmp_path / "vec.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 4, 4, 3), np.float32), isVector=True), str(vec))
    with pytest.raises(CTLoadError, match="components"):
        load_ct(vec)


def test_attenuation_and_bone_mask():
    hu = np.array([[[-1000.0, 0.0, 1000.0, -2048.0]]], dtype=np.float32)
    ct = CTVolume(hu=np.repeat(np.repeat(hu, 2, 0), 2, 1), T_ct_from_ijk=np.eye(4))
    mu = ct.mu()
    assert mu.dtype == np.float32
    assert np.allclose(mu[0, 0], [0.0, MU_WATER_PER_MM, 2 * MU_WATER_PER_MM, 0.0])
    assert ct.bone_mask(threshold_hu=200)[0, 0].tolist() == [False, False, True, False]


def test_crop_and_binning_keep_physical_positions():
    img, arr = make_image(shape_kji=(12, 14, 16), seed=4)
    labels = np.zeros(arr.shape, np.uint8)
    labels[3:6, 4:9, 5:11] = 7
    T = np.eye(4)
    T[:3, :3] = np.asarray(img.GetDirection()).reshape(3, 3) * np.asarray(img.GetSpacing())
    T[:3, 3] = img.GetOrigin()
    ct = CTVolume(hu=arr.astype(np.float32), T_ct_from_ijk=T, labels=labels)
    crop = ct.crop_ijk((2, 3, 1), (10, 12, 9))
    assert crop.hu.shape == (8, 9, 8)
    for ijk in [(0, 0, 0), (3, 4, 5), (7, 8, 7)]:
        i, j, k = ijk
        assert crop.hu[k, j, i] == ct.hu[k + 1, j + 3, i + 2]
        assert np.allclose(crop.ijk_to_ct(np.array([ijk]))[0], ct.ijk_to_ct(np.array([[i + 2, j + 3, k + 1]]))[0])
    roi = ct.crop_to_labels([7], margin_mm=1.0)
    pts_all = ct.label_points_ct_mm([7])
    pts_roi = roi.label_points_ct_mm([7])
    assert np.allclose(np.sort(pts_all, axis=0), np.sort(pts_roi, axis=0))
    b = ct.binned((2, 2, 3))
    assert b.hu.shape == (4, 7, 8)
    block = ct.hu[0:3, 0:2, 0:2]
    assert np.isclose(b.hu[0, 0, 0], block.mean(), atol=1e-4)
    centre = ct.ijk_to_ct(np.array([[i, j, k] for k in range(3) for j in range(2) for i in range(2)], dtype=float)).mean(0)
    assert np.allclose(b.ijk_to_ct(np.zeros((1, 3)))[0], centre)
    assert b.labels is not None and b.labels.max() == 7
    with pytest.raises(ConfigError):
        ct.crop_ijk((0, 0, 0), (1, 5, 5))
    with pytest.raises(ConfigError):
        ct.crop_to_labels([99])


def test_label_table_and_names(tmp_path):
    csv = tmp_path / "s.csv"
    csv.write_text("group,original_idx,structure,id\nvertebrae,12,vertebrae_T8,36\nribs,1,rib_left_1,92\n")
    table = read_label_table(csv)
    assert table == {"vertebrae_T8": 36, "rib_left_1": 92}
    assert resolve_label("T8", table) == 36
    assert resolve_label("t8", table) == 36
    assert resolve_label("vertebrae_T8", table) == 36
    assert resolve_label(5, table) == 5
    with pytest.raises(ConfigError):
        resolve_label("T99", table)
