"""Fluoroscopy sequence simulation: trajectories, image degradations, foreign objects, bags."""

from .degrade import XrayDegradation, degrade
from .physics import BONE_CONTRAST, fluoro_attenuation, xray_renderer
from .objects import Cylinder, project_cylinders, screw, wire
from .scenarios import VIEWS, CArmSetup, make_objects, make_trajectory, structure_center, view_pose
from .sequence import SimulatedSequence, render_line_integrals, simulate_sequence

__all__ = [
    "XrayDegradation",
    "degrade",
    "BONE_CONTRAST",
    "fluoro_attenuation",
    "xray_renderer",
    "Cylinder",
    "project_cylinders",
    "screw",
    "wire",
    "VIEWS",
    "CArmSetup",
    "make_objects",
    "make_trajectory",
    "structure_center",
    "view_pose",
    "SimulatedSequence",
    "render_line_integrals",
    "simulate_sequence",
]
