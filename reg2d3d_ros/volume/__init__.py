"""CT volumes: loading in the physical frame, attenuation, bone masks, crops to a structure; the target's
region and bone attenuation (:mod:`.target`)."""

from .ct import (
    LABEL_SET_CHOICES,
    MU_WATER_PER_MM,
    CTVolume,
    LabelTable,
    add_ct_arguments,
    add_label_arguments,
    builtin_label_table,
    detect_label_set,
    grid_mismatch,
    load_ct,
    read_label_table,
    resolve_label,
)
from .target import BONE_FLOOR_HU, structure_region, target_attenuation

__all__ = ["BONE_FLOOR_HU", "LABEL_SET_CHOICES", "MU_WATER_PER_MM", "CTVolume", "LabelTable", "add_ct_arguments", "add_label_arguments", "builtin_label_table",
           "detect_label_set", "grid_mismatch", "load_ct", "read_label_table", "resolve_label", "structure_region", "target_attenuation"]
