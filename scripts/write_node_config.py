"""Write config/registration.yaml from the node's PARAMETERS table (run after changing a parameter)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from reg2d3d_ros.ros.node import PARAMETERS  # noqa: E402

lines = ["# Defaults of reg2d3d_ros/ros/node.py (kept equal by test/test_node_files.py;",
         "# regenerate with scripts/write_node_config.py).",
         "# Use with: --ros-args --params-file config/registration.yaml -p ct_path:=... -p labels_path:=...",
         "/**:", "  ros__parameters:"]
for name, default, desc, unit, rng, ro in PARAMETERS:
    c = desc + (f" [{unit}]" if unit else "") + (" (read-only)" if ro else "")
    if isinstance(rng, tuple) and isinstance(rng[0], str):
        c += "; one of: " + ", ".join(rng)
    v = json.dumps(default) if isinstance(default, (str, bool)) else repr(default)
    lines += [f"    # {c}", f"    {name}: {v}"]
out = Path(__file__).resolve().parents[1] / "config" / "registration.yaml"
out.write_text("\n".join(lines) + "\n")
print(f"wrote {out}")
