"""Simulate a fluoroscopy sequence around a vertebra and write it as a rosbag2 bag.

Example::

    python -m reg2d3d_ros.sim --vertebra T8 --view ap --trajectory smooth --frames 60 --out /tmp/seq
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..errors import run_cli


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    ap = argparse.ArgumentParser(prog="python -m reg2d3d_ros.sim", description=__doc__.split("\n\n")[0])
    ap.add_argument("--ct", type=Path, default=None, help="CT file or DICOM folder (default: the example CT)")
    ap.add_argument("--labels", type=Path, default=None, help="label map of the CT (default: the example's)")
    ap.add_argument("--label-table", type=Path, default=None, help="CSV naming the labels (structure,id)")
    ap.add_argument("--vertebra", default="T8", help="target structure, e.g. T8 (centre of the views)")
    ap.add_argument("--view", default="ap", help="ap, lateral, oblique, rao or 'LAO,CRAN' in degrees")
    ap.add_argument("--trajectory", default="smooth", choices=["static", "smooth", "carm_rotation", "jumps"])
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--fps", type=float, default=15.0)
    ap.add_argument("--size", type=int, default=256, help="image width and height, pixels")
    ap.add_argument("--sdd-mm", type=float, default=1020.0)
    ap.add_argument("--sid-mm", type=float, default=680.0)
    ap.add_argument("--detector-mm", type=float, default=307.2, help="detector width, mm")
    ap.add_argument("--dose", type=float, default=2.0e5, help="photons per pixel (0 = no quantum noise)")
    ap.add_argument("--bone-contrast", type=float, default=1.8, help="bone excess attenuation at fluoroscopy vs CT energy")
    ap.add_argument("--display", default="attenuation", choices=["attenuation", "transmission"])
    ap.add_argument("--encoding", default="mono16", choices=["mono8", "mono16", "32FC1"])
    ap.add_argument("--objects", default="none", choices=["none", "wire", "screw", "both"])
    ap.add_argument("--bin", type=int, default=2, help="in-plane CT binning for speed (1 = full resolution)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--storage", default="mcap", choices=["mcap", "sqlite3"])
    ap.add_argument("--out", type=Path, required=True, help="bag folder to write")
    ap.add_argument("--overwrite", action="store_true")
    return ap


def parse_view(text: str):
    """A view name or ``'LAO,CRAN'`` degrees."""
    if "," in text:
        lao, cran = (float(x) for x in text.split(","))
        return (lao, cran)
    return text


def run(args) -> Path:
    """Simulate and write the bag described by parsed ``args``; returns the bag folder."""
    from ..example import example_paths
    from ..progress import Steps
    from ..volume import load_ct
    from .bag import write_sequence_bag
    from .degrade import XrayDegradation
    from .physics import xray_renderer
    from .scenarios import CArmSetup, make_objects, make_trajectory, structure_center, view_pose
    from .sequence import simulate_sequence

    if args.ct is None:
        ex = example_paths()
        args.ct, args.labels, args.label_table = ex.ct, ex.labels, ex.label_table
    t0 = time.perf_counter()
    step = Steps(3)
    step(f"loading CT {args.ct}")
    ct = load_ct(args.ct, labels_path=args.labels, label_table=args.label_table)
    center = structure_center(ct, args.vertebra)
    setup = CArmSetup(args.sdd_mm, args.sid_mm, args.detector_mm / args.size, args.size, args.size)
    view = parse_view(args.view)
    T0 = view_pose(center, setup, view)
    poses = make_trajectory(args.trajectory, T0, args.frames, center, setup, view=view, fps=args.fps, seed=args.seed)
    renderer = xray_renderer(ct, bone_contrast=args.bone_contrast, binning=args.bin)
    deg = XrayDegradation(photons_per_pixel=args.dose or None, display=args.display, encoding=args.encoding)
    step(f"simulating {args.frames} frames ({args.trajectory}, view {args.view}, {args.size}x{args.size})")
    seq = simulate_sequence(
        renderer,
        setup.intrinsics(),
        poses,
        deg,
        fps=args.fps,
        seed=args.seed,
        objects=make_objects(args.objects, center),
        progress=True,
        meta={"ct": str(args.ct), "vertebra": args.vertebra, "view": args.view, "trajectory": args.trajectory, "sid_mm": args.sid_mm},
    )
    step(f"writing the bag ({args.storage})")
    path = write_sequence_bag(seq, args.out, storage=args.storage, overwrite=args.overwrite)
    print(f"wrote {len(seq)} frames to {path} ({time.perf_counter() - t0:.1f} s)")
    return path


def main(argv=None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    return run_cli(lambda: run(args), "python -m reg2d3d_ros.sim")


if __name__ == "__main__":
    sys.exit(main())
