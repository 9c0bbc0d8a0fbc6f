"""One PPC-L update on the held-out test cases, two PPC-L models side by side, randomised and nominal physics.

The one-update study of :func:`reg2d3d_ros.eval.run_ppcl.one_update_study` (test vertebrae T6, T8,
T10, T12, AP and lateral, 512 px; starts 0-45 mm off; one update at level 0.25; classic PPC in 6
DoF and in-plane on the same starts) for the committed-before nominal model and a retrained one.

Usage::

    python benchmarks/ppcl_one_update.py OUT.json --nominal-model P --randomised-model P [--starts 20]   # ~8 min
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--nominal-model", required=True, help="e.g. models/ppcl/ppcl.pt of commit cfe966a (nominal physics)")
    ap.add_argument("--randomised-model", required=True, help="e.g. models/ppcl/ppcl.pt now (randomised physics)")
    ap.add_argument("--starts", type=int, default=20, help="starts per case")
    args = ap.parse_args(argv)
    from reg2d3d_ros.eval.cases import TEST, make_cases
    from reg2d3d_ros.eval.run_ppcl import one_update_study
    from reg2d3d_ros.example import load_example
    from reg2d3d_ros.ppcl import LearnedWeighting
    from reg2d3d_ros.sim import CArmSetup

    ct = load_example()
    out = {}
    for physics in ("randomised", "nominal"):
        cases = make_cases(ct, replace(TEST, physics=physics), 1, max_mtre_mm=30.0, setup=CArmSetup().at_size(512))
        for name, path in (("nominal model", args.nominal_model), ("randomised model", args.randomised_model)):
            r = one_update_study(ct, cases, LearnedWeighting.load(path), {}, n_starts=args.starts, progress=False)
            out[f"{physics} frames, {name}"] = {k: {"n": len(v["mtre_mm"]), "mtre_mean_mm": round(float(np.mean(v["mtre_mm"])), 2),
                                                   "mtre_p50_mm": round(float(np.median(v["mtre_mm"])), 2),
                                                   "pe_p50_px": round(float(np.median(v["pe_px"])), 1)} for k, v in r.items()}
            print(physics, name, json.dumps(out[f"{physics} frames, {name}"]), flush=True)
            with open(args.out, "w") as fh:
                json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
