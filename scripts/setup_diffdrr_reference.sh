#!/usr/bin/env bash
# Test-only environment for DiffDRR 0.6.1 (MIT), used once to render the reference images in
# test/data/diffdrr_reference.npz (tools/make_diffdrr_reference.py). It is NOT a project
# dependency and the project's own venv (.venv) is never touched.
#
# DiffDRR's declared requirements pull torchvision (no CPU build here), timm, kornia, pyvista,
# matplotlib, seaborn, ... none of which the rendering path needs. So: CPU torch first, then
# everything else with --no-deps, pinned to the versions verified to make
#   from diffdrr.drr import DRR; from diffdrr.data import read
# work and to produce the reference bit for bit. Declared-but-unused dependencies that are left
# out on purpose: torchio's rich and typer (its CLI only), jaxtyping's wadler-lindig,
# python-dateutil's tzdata (pandas finds the system zoneinfo on Linux), torchvision, timm, kornia,
# roma, pyvista, matplotlib, seaborn, imageio.
#
# Usage: scripts/setup_diffdrr_reference.sh        (idempotent; PYTHON=... to pick the interpreter,
#        DIFFDRR_VENV=... to put the environment elsewhere)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DIFFDRR_VENV:-$REPO/.venv-diffdrr}"
PYTHON="${PYTHON:-python3}"
TORCH_WHEEL="/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"
TORCH_VERSION="2.13.0+cpu"

# Installed with --no-deps, in this order (verified set; see tools/README_diffdrr_reference.md).
PINNED=(
  "diffdrr==0.6.1"
  "fastcore==2.2.39"        # diffdrr.detector / diffdrr.drr (@patch)
  "einops==0.8.2"           # diffdrr.pose, torchio
  "torchio==1.2.1"          # diffdrr.data / diffdrr.drr (Subject, ScalarImage)
  "numpy==2.4.6"
  "scipy==1.17.1"           # diffdrr.pose, torchio; dense reference integrals
  "nibabel==5.4.2"          # diffdrr.data, torchio
  "simpleitk==2.5.7"        # torchio's reader; the generator reads the CT with it too
  "pandas==3.1.1"           # diffdrr.data (module import)
  "python-dateutil==4.0.0"  # pandas
  "packaging==26.3"         # torchio, nibabel
  "tqdm==4.70.1"            # torchio
  "jaxtyping==0.3.11"       # torchio
  "humanize==4.17.0"        # torchio
  "Deprecated==1.3.1"       # torchio
  "wrapt==2.5.2"            # Deprecated
)

say() { printf '[setup-diffdrr] %s\n' "$*"; }

if [ -x "$VENV/bin/python" ]; then
  say "virtual environment exists: $VENV"
else
  ver="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
  if [ "$ver" != "3.11" ]; then
    say "error: $PYTHON is Python $ver; the CPU torch wheel is for CPython 3.11 (set PYTHON=...)" >&2
    exit 2
  fi
  say "creating virtual environment $VENV with $("$PYTHON" -c 'import sys; print(sys.executable)')"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

have_torch="$("$VENV/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null || true)"
if [ "$have_torch" = "$TORCH_VERSION" ]; then
  say "torch $have_torch already installed"
elif [ -f "$TORCH_WHEEL" ]; then
  say "installing CPU torch from $TORCH_WHEEL"
  "${PIP[@]}" install --quiet "$TORCH_WHEEL"
else
  say "installing torch==2.13.0 (CPU build expected from the configured index / find-links)"
  "${PIP[@]}" install --quiet "torch==2.13.0"
fi

missing=()
installed="$("${PIP[@]}" list --format=freeze 2>/dev/null | tr '[:upper:]_' '[:lower:]-')"
for spec in "${PINNED[@]}"; do
  name="$(printf '%s' "${spec%%==*}" | tr '[:upper:]_' '[:lower:]-')"
  want="${spec##*==}"
  have="$(printf '%s\n' "$installed" | awk -F'==' -v n="$name" '$1 == n {print $2}')"
  if [ "$have" = "$want" ]; then
    say "ok       $spec"
  else
    say "install  $spec${have:+ (found $have)}"
    missing+=("$spec")
  fi
done
if [ "${#missing[@]}" -gt 0 ]; then
  "${PIP[@]}" install --quiet --no-deps "${missing[@]}"
fi

say "checking the rendering path imports"
"$VENV/bin/python" - <<'EOF'
import diffdrr, torch, torchio
from diffdrr.drr import DRR  # noqa: F401
from diffdrr.data import read  # noqa: F401
from diffdrr.pose import convert  # noqa: F401
print(f"[setup-diffdrr] diffdrr {diffdrr.__version__}, torch {torch.__version__}, torchio {torchio.__version__}: ok")
EOF
say "done. Render the reference with:"
say "  $VENV/bin/python $REPO/tools/make_diffdrr_reference.py"
