"""CT volumes: loading in the physical frame, attenuation, bone masks, crops to a structure."""

from .ct import (
    LABEL_SET_CHOICES,
    MU_WATER_PER_MM,
    CTVolume,
    LabelTable,
    add_label_arguments,
    builtin_label_table,
    detect_label_set,
    grid_mismatch,
    load_ct,
    read_label_table,
    resolve_label,
)

__all__ = ["LABEL_SET_CHOICES", "MU_WATER_PER_MM", "CTVolume", "LabelTable", "add_label_arguments", "builtin_label_table",
           "detect_label_set", "grid_mismatch", "load_ct", "read_label_table", "resolve_label"]
