"""Choose ``ambiguity_gc_ratio`` on the tuning split's single-frame registrations.

Reads ``single_frame.jsonl`` of a benchmark run made with the check off (``ambiguity_gc_ratio``
0: every refused start-near optimum's peak check and how far the search moved are recorded) and
replays the check offline for a range of ratios: a published pose becomes unpublished when its
refused start-near optimum had a peak more than ``max_peak_offset_mm`` away, a gradient
correlation at least ``ratio`` times that peak's, and the search moved more than
``max_peak_offset_mm``. Prints (and writes with ``--out``) published-correct and published-wrong
counts per ratio.

Usage::

    python benchmarks/tune_ambiguity.py reports/benchmark/full_tuning/single_frame.jsonl [--out benchmarks/results/ambiguity.md]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

WRONG_MRPD_MM = 2.0
MAX_PEAK_OFFSET_MM = 3.0  # the pipeline's default max_peak_offset_mm


def replay(rows: list, ratio: float) -> dict:
    """Published correct / wrong / refused-by-ambiguity counts when the check runs at ``ratio`` (0: off)."""
    correct = wrong = refused = lost_correct = 0
    for r in rows:
        published = r["answered"]
        lp = r.get("local_peak")
        if published and ratio > 0 and lp and lp["offset_mm"] > MAX_PEAK_OFFSET_MM and lp["peak_gc"] > 0 \
                and lp["gc"] >= ratio * lp["peak_gc"] and lp.get("search_moved_mm", 0.0) > MAX_PEAK_OFFSET_MM:
            published = False
            refused += 1
            lost_correct += r.get("mrpd_mm", float("inf")) <= WRONG_MRPD_MM
        if published:
            ok = r.get("mrpd_mm", float("inf")) <= WRONG_MRPD_MM
            correct += ok
            wrong += not ok
    return {"ratio": ratio, "registrations": len(rows), "published_correct": correct, "published_wrong": wrong, "refused_as_ambiguous": refused,
            "correct_lost": lost_correct}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if not args.results.exists():
        print(f"error: {args.results} does not exist", file=sys.stderr)
        return 2
    rows = [json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]
    with_peak = [r for r in rows if r.get("local_peak")]
    lines = [f"# ambiguity_gc_ratio on {args.results} ({len(rows)} registrations, {len(with_peak)} with a refused start-near optimum)", "",
             "| ratio | published correct | published wrong | refused as ambiguous | of them correct |", "|---|---|---|---|---|"]
    for ratio in (0.0, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98):
        s = replay(rows, ratio)
        lines.append(f"| {ratio:g} | {s['published_correct']} | {s['published_wrong']} | {s['refused_as_ambiguous']} | {s['correct_lost']} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
