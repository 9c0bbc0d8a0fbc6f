"""Fluoroscopy sequence simulation: trajectories, image degradations, domain randomisation, foreign objects, bags."""

from .degrade import XrayDegradation, degrade
from .physics import BONE_CONTRAST, attenuation_components, fluoro_attenuation, xray_renderer
from .objects import Cylinder, project_cylinders, screw, wire
from .randomize import (
    DomainDraw,
    DomainRanges,
    compose_frame,
    domain_from_seed,
    domain_objects,
    draw_domain,
    render_components,
    simulate_randomised_sequence,
)
from .scenarios import VIEWS, CArmSetup, make_objects, make_trajectory, structure_center, view_pose
from .sequence import SimulatedSequence, render_line_integrals, simulate_sequence

__all__ = [
    "XrayDegradation",
    "degrade",
    "BONE_CONTRAST",
    "attenuation_components",
    "fluoro_attenuation",
    "xray_renderer",
    "Cylinder",
    "project_cylinders",
    "screw",
    "wire",
    "DomainDraw",
    "DomainRanges",
    "compose_frame",
    "domain_from_seed",
    "domain_objects",
    "draw_domain",
    "render_components",
    "simulate_randomised_sequence",
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
