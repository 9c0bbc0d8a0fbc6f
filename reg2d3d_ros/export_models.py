"""Export every network of this project's model files to ONNX and check ONNX Runtime against PyTorch.

Usage::

    python -m reg2d3d_ros.export_models [PATH ...] [--no-check] [--tolerance 1e-4]

``PATH`` is a model file or a folder searched recursively for model files (default: the
repository's ``models/``). Every network is written next to its file (``scr.onnx``,
``ppcl.level_0.25.onnx``, ``ppcflow.flow.onnx``, ...; :func:`reg2d3d_ros.engines.onnx_path_for`)
with ONNX opset :data:`reg2d3d_ros.engines.OPSET` (17) and the SHA-256 of its source file in the
graph's metadata, so that a graph from another model file is never used. Then each graph runs
in ONNX Runtime (CPU) and its module in PyTorch on the same seeded random inputs (for networks
with variable sizes, at two sizes) and the largest absolute difference is printed; above the
tolerance (relative to the output's scale) the command fails (exit 1). Exit 2: bad arguments or
an unreadable model file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import ppcflow, ppcl, scr  # noqa: F401  (importing a method registers the format of its model files)

REPO = Path(__file__).resolve().parents[1]


def check_inputs(spec) -> list:
    """Seeded random input sets for one network: its example shape, and a second size where axes vary."""
    import torch

    g = torch.Generator().manual_seed(1)
    sets = []
    variants = [dict(spec.inputs)]
    if spec.dynamic:
        alt = {}
        for name, shape in spec.inputs.items():
            s = list(shape)
            for ax in spec.dynamic.get(name, {}):
                if ax > 0:
                    s[ax] = s[ax] // 2 + 4 * (ax + 1)  # e.g. 260 points, 72 x 80 pixels
            alt[name] = tuple(s)
        variants.append(alt)
    for shapes in variants:
        xs = []
        for name, shape in shapes.items():
            if spec.dtypes[name] == "bool":
                m = torch.rand(shape, generator=g) < 0.9
                m[..., 0] = True
                xs.append(m)
            else:
                xs.append(torch.randn(shape, generator=g))
        sets.append(xs)
    return sets


def compare(model_path, name: str) -> float:
    """Largest |ONNX Runtime - PyTorch| over the check inputs, relative to the output's largest magnitude (floor 1)."""
    from .engines import load, networks_of

    spec = networks_of(model_path)[name]
    ort = load(model_path, name, "onnxruntime", "cpu")
    if ort.backend != "onnxruntime":
        raise RuntimeError(f"ONNX Runtime could not run {name}: {'; '.join(ort.notes)}")
    ref = load(model_path, name, "pytorch", "cpu")
    worst = 0.0
    for xs in check_inputs(spec):
        a, b = ort(*xs), ref(*xs)
        if a.shape != b.shape:
            raise RuntimeError(f"{name}: ONNX Runtime output {tuple(a.shape)} != PyTorch {tuple(b.shape)}")
        worst = max(worst, float((a - b).abs().max()) / max(1.0, float(b.abs().max())))
    return worst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m reg2d3d_ros.export_models", description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="*", type=Path, default=[REPO / "models"], help="model files or folders (default: models/)")
    ap.add_argument("--no-check", action="store_true", help="export only; do not compare ONNX Runtime with PyTorch")
    ap.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed relative difference ONNX Runtime vs PyTorch")
    args = ap.parse_args(argv)

    from .engines import OPSET, export_network, file_sha256, model_files, networks_of, onnx_path_for
    from .errors import Reg2D3DError

    files = []
    for p in args.paths:
        if p.is_dir():
            files += model_files(p)
        elif p.is_file():
            files.append(p)
        else:
            print(f"error: {p} does not exist", file=sys.stderr)
            return 2
    if not files:
        print(f"error: no model files of reg2d3d_ros under {', '.join(map(str, args.paths))}", file=sys.stderr)
        return 2
    failed = 0
    for f in files:
        try:
            specs = networks_of(f)
        except Reg2D3DError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        sha = file_sha256(f)
        for name, spec in specs.items():
            out = onnx_path_for(f, name, len(specs))
            export_network(spec, out, sha)
            line = f"{f} [{name}] -> {out} (opset {OPSET}, {out.stat().st_size / 1e6:.2f} MB)"
            if not args.no_check:
                diff = compare(f, name)
                ok = diff <= args.tolerance
                failed += not ok
                line += f"; ONNX Runtime vs PyTorch max relative difference {diff:.2e} {'ok' if ok else 'ABOVE ' + str(args.tolerance)}"
            print(line, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
