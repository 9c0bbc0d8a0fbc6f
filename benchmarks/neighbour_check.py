"""The neighbour check (``max_neighbour_gc_ratio``) at the true pose and at neighbour locks, on the benchmark's frames.

For frame 0 of every static sequence of the full tier (randomised physics and DiffDRR, the tuning
split T7/T9/T11 on which the threshold is chosen, and the held-out split T6/T8/T10/T12 on which
it is reported) the check of :mod:`reg2d3d_ros.ppc.context` scores the true pose and the two
poses that a lock onto the vertebra above or below gives (``T_gt @ translation(c_neighbour -
c_target)``). A good check gives a small ratio at the truth and a large one at the locks.

Usage::

    python benchmarks/neighbour_check.py [--out benchmarks/results]   # about 5 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch


def write_summary(rows: list, thr: float, out: Path) -> None:
    """``out/neighbour_check.md``: per split and source, the largest ratio at the truth and the smallest at a lock."""
    lines = ["# Neighbour check: whole-CT gradient correlation, the pose vs the target moved onto a neighbouring vertebra", "",
             f"Command: `python benchmarks/neighbour_check.py`. Frame 0 of the full tier's static sequences; ratio = best "
             f"neighbour-shifted pose's correlation / the pose's; the pipeline refuses an initialisation at ratio >= {thr}.", "",
             "| split | source | frames | truth ratio max | truth refused | lock ratio min | locks caught |", "|---|---|---|---|---|---|---|"]
    for split in ("tuning", "heldout"):
        for source in sorted({r["source"] for r in rows}):
            rs = [r for r in rows if r["split"] == split and r["source"] == source]
            if not rs:
                continue
            truth = np.array([r["truth_ratio"] for r in rs])
            locks = np.array([v for r in rs for k, v in r.items() if k.startswith("lock_ratio_")])
            lines.append(f"| {split} | {source} | {len(rs)} | {truth.max():.2f} | {int((truth >= thr).sum())} | {locks.min():.2f} | "
                         f"{int((locks >= thr).sum())}/{len(locks)} |")
    (out / "neighbour_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--threshold", type=float, default=None, help="threshold to report (default: the pipeline's max_neighbour_gc_ratio)")
    ap.add_argument("--summary-only", action="store_true", help="only rewrite the table from OUT/neighbour_check.jsonl")
    args = ap.parse_args(argv)
    from reg2d3d_ros.eval import benchmark as B
    from reg2d3d_ros.ppc.context import NeighbourCheck
    from reg2d3d_ros.settings import BY_NAME

    thr = args.threshold if args.threshold is not None else BY_NAME["max_neighbour_gc_ratio"].default
    if args.summary_only:
        write_summary(B.read_jsonl(args.out / "neighbour_check.jsonl"), thr, args.out)
        return 0
    ct, intr, frames = B.static_first_frames()
    rows, checks = [], {}
    for split, spec, T, img in frames:
        if spec.vertebra not in checks:
            checks[spec.vertebra] = NeighbourCheck.from_ct(ct, ct.structure_id(spec.vertebra))
        chk = checks[spec.vertebra]
        truth = chk(img, intr, T)
        row = {"split": split, "source": spec.source, "view": spec.view, "vertebra": spec.vertebra, "truth_ratio": round(truth["ratio"], 3),
               "truth_gc": round(truth["gc"], 4)}
        for name, off in chk.offsets_ct_mm.items():
            S = torch.eye(4, dtype=torch.float64)
            S[:3, 3] = -torch.from_numpy(off)  # the lock: the target's surface placed on this neighbour
            row[f"lock_ratio_{name}"] = round(chk(img, intr, T @ S)["ratio"], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "neighbour_check.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_summary(rows, thr, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
