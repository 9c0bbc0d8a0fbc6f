"""``python -m reg2d3d_ros.replay BAG``: replay a rosbag2 bag onto the graph (see :mod:`reg2d3d_ros.ros.replay`)."""

import sys

from .ros.replay import main

if __name__ == "__main__":
    sys.exit(main())
