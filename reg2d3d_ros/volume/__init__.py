"""CT volumes: loading in the physical frame, attenuation, bone masks, crops to a structure."""

from .ct import MU_WATER_PER_MM, CTVolume, load_ct, read_label_table, resolve_label

__all__ = ["MU_WATER_PER_MM", "CTVolume", "load_ct", "read_label_table", "resolve_label"]
