"""Replay ``max_neighbour_gc_ratio`` offline on a single-frame run made with a higher threshold.

A published registration whose recorded neighbour-check ratio is at or above the threshold would
not have been published. (Approximate: the node would then also have run the in-plane search,
which can find the right pose; that gain is not counted.)

Usage::

    python benchmarks/neighbour_threshold.py RUN/single_frame.jsonl [--out benchmarks/results/neighbour_threshold.md]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from compare_single_frame import read_rows, tally, write_table  # the same directory: one home for the counting


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", type=Path, nargs="+")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    lines = ["# max_neighbour_gc_ratio replayed on single-frame registrations", "",
             "| run | registrations | threshold | published | published correct | published wrong |", "|---|---|---|---|---|---|"]
    for path in args.results:
        if not path.exists():
            print(f"error: {path} does not exist", file=sys.stderr)
            return 2
        rows = list(read_rows(path).values())
        for thr in (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7):
            # a registration at or over the threshold would not have been published
            t = tally([{**r, "answered": r["answered"] and r.get("neighbour_check", {}).get("ratio", 0.0) < thr} for r in rows])
            lines.append(f"| {path} | {len(rows)} | {thr:g} | {t['published']} | {t['published_correct']} | {t['published_wrong']} |")
    write_table(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
