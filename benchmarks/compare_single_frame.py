"""Paired comparison of two single-frame runs (the same frames and starts): published correct / wrong.

Usage::

    python benchmarks/compare_single_frame.py A/single_frame.jsonl B/single_frame.jsonl [--out FILE.md]

Only the registrations present in both files count (an unfinished run is compared on its part).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

WRONG_MRPD_MM = 2.0


def read_rows(path: Path) -> dict:
    """``{(frame key, start): row}`` of a single-frame results file."""
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            out[(r["key"], r["start"])] = r
    return out


def tally(rows) -> dict:
    """Registrations, successes (registered within 2 mm), published, published correct and wrong."""
    pub = [r for r in rows if r["answered"]]
    ok = [r for r in pub if r.get("mrpd_mm", float("inf")) <= WRONG_MRPD_MM]
    success = [r for r in rows if r.get("mrpd_mm", float("inf")) <= WRONG_MRPD_MM]
    return {"n": len(rows), "published": len(pub), "published_correct": len(ok), "published_wrong": len(pub) - len(ok), "success": len(success)}


def write_table(lines: list, out: Path | None) -> None:
    """Print a markdown table (its lines) and write it to ``out`` when given."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        out.write_text(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    for p in (args.a, args.b):
        if not p.exists():
            print(f"error: {p} does not exist", file=sys.stderr)
            return 2
    a, b = read_rows(args.a), read_rows(args.b)
    keys = sorted(set(a) & set(b))
    lines = [f"# Single frame, paired: {args.a} vs {args.b} ({len(keys)} registrations in both)", "",
             "| run | source | registrations | success (registered within 2 mm) | published | published correct | published wrong |",
             "|---|---|---|---|---|---|---|"]
    for name, rows in (("A", a), ("B", b)):
        for source in sorted({rows[k]["source"] for k in keys}):
            t = tally([rows[k] for k in keys if rows[k]["source"] == source])
            lines.append(f"| {name} | {source} | {t['n']} | {t['success']} | {t['published']} | {t['published_correct']} | {t['published_wrong']} |")
    write_table(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
