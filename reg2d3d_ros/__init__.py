"""reg2d3d_ros: real-time 2-D/3-D registration of C-arm X-ray frames to a pre-operative CT.

The package is a pure library (no ROS imports outside :mod:`reg2d3d_ros.ros`) with one
subpackage per concern and per method, plus the ROS 2 layer over it. Each learned method is
split into what the node loads at run time (``model``) and what its training runs (``train``).

Foundations:

- :mod:`reg2d3d_ros.geometry`: frames, SE(3), C-arm intrinsics, projection (the conventions
  used everywhere are fixed in that module's docstring);
- :mod:`reg2d3d_ros.volume`: CT loading in the physical (LPS) frame, attenuation, masks, crops,
  the target's region and bone attenuation;
- :mod:`reg2d3d_ros.drr`: differentiable ray casting, gradient images, bone-surface depths;
- :mod:`reg2d3d_ros.sim`: fluoroscopy sequence simulation, domain randomisation, rosbag2 writing;
- :mod:`reg2d3d_ros.nets`: the networks of the learned methods (pure PyTorch);
- :mod:`reg2d3d_ros.engines`: inference back-ends (PyTorch, ONNX Runtime, TensorRT) and model
  files; the methods register their file formats with it.

Methods:

- :mod:`reg2d3d_ros.scr`: scene coordinate regression + RANSAC PnP, the first-frame initialiser;
- :mod:`reg2d3d_ros.ppc`: classic point-to-plane correspondence registration, tracking, in-plane search;
- :mod:`reg2d3d_ros.ppcl`: PPC-L, correspondence weights learned through the PPC solver;
- :mod:`reg2d3d_ros.ppcflow`: PPC Flow / PPC Flow Attention, a learned update operator;
- :mod:`reg2d3d_ros.intensity`: intensity-based registration on the differentiable DRR;
- :mod:`reg2d3d_ros.similarity`: the correlation-driven learned similarity (the ``learned`` metric).

The whole:

- :mod:`reg2d3d_ros.settings`: every setting of the node and the pipeline, defined once (name,
  default, unit, range, description); the pipeline's config, the node's parameters and
  ``config/registration.yaml`` are derived from it;
- :mod:`reg2d3d_ros.pipeline`: the registration pipeline the node runs (:mod:`reg2d3d_ros.viz`:
  its overlays);
- :mod:`reg2d3d_ros.training`: what the methods' training commands share;
- :mod:`reg2d3d_ros.eval`: registration metrics (mTRE, mRPD, SR, CR), start positions, the
  evaluations and the generalisation benchmark;
- :mod:`reg2d3d_ros.ros`: the ROS 2 layer (the node, bag replay and recording, a client of the
  node on a graph);
- commands: :mod:`reg2d3d_ros.demo`, :mod:`reg2d3d_ros.prepare`, :mod:`reg2d3d_ros.trial`,
  :mod:`reg2d3d_ros.example`, :mod:`reg2d3d_ros.export_models`.
"""

__version__ = "0.1.0"
