"""reg2d3d_ros: real-time 2-D/3-D registration of C-arm X-ray frames to a pre-operative CT.

The package is a pure library (no ROS imports) organised in subpackages, plus one thin ROS 2
node over it:

- :mod:`reg2d3d_ros.geometry`: frames, SE(3), C-arm intrinsics, projection (the conventions
  used everywhere are fixed in that module's docstring);
- :mod:`reg2d3d_ros.volume`: CT loading in the physical (LPS) frame, attenuation, masks, crops;
- :mod:`reg2d3d_ros.drr`: differentiable ray casting, gradient images, bone-surface depths;
- :mod:`reg2d3d_ros.sim`: fluoroscopy sequence simulation and rosbag2 writing;
- :mod:`reg2d3d_ros.eval`: registration metrics (mTRE, mRPD, SR, CR) and start positions.
"""

__version__ = "0.1.0"
