"""``python -m reg2d3d_ros.record OUT``: record topics into a rosbag2 bag (see :mod:`reg2d3d_ros.ros.record`)."""

import sys

from .ros.record import main

if __name__ == "__main__":
    sys.exit(main())
