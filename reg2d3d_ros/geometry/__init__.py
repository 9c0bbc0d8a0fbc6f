"""Geometry: frames, rigid transforms, C-arm intrinsics and projection.

This docstring fixes the conventions used by the whole library. Other modules refer to it
instead of restating it.

Frames
------
``ct``
    The physical frame of the CT exactly as SimpleITK reports it
    (``TransformIndexToPhysicalPoint``): LPS, with the volume's origin, direction and spacing,
    no re-centring. Inside the library lengths are **millimetres**; on the ROS graph metres.
``ijk``
    Continuous voxel index of the CT: ``(i, j, k)`` = (column, row, slice) of the SimpleITK
    image, voxel centres at integers. NumPy/torch volume arrays are stored ``(D, H, W)`` =
    ``(k, j, i)`` (the ``sitk.GetArrayFromImage`` order).
``optical``
    The C-arm optical frame: origin at the X-ray focal spot, +z along the principal ray towards
    the detector (perpendicular to it), +x along increasing image column, +y along increasing
    image row. Millimetres inside the library.

Transforms
----------
``T_a_from_b`` is a ``(..., 4, 4)`` homogeneous matrix with ``p_a = R p_b + t``. The pose the
node publishes is ``T_optical_from_ct``. Composition reads right to left:
``T_a_from_c = T_a_from_b @ T_b_from_c``.

Twists
------
``xi`` is ``(..., 6)`` = ``(wx, wy, wz, vx, vy, vz)``: rotation vector in radians first, then
translation in millimetres. :func:`se3_exp` is the true SE(3) exponential (translation is
``V(w) v``), :func:`se3_log` its inverse.

Pixels and intrinsics
---------------------
A pixel position is ``(u, v)`` = (column, row) in pixels; ``(0, 0)`` is the centre of the
first pixel of the first row (OpenCV). Images are tensors ``(B, H, W)`` (``H`` rows).
``K`` is ``(..., 3, 3)`` ``[[fx, 0, cx], [0, fy, cy], [0, 0, 1]]`` in pixels; a point
``p_ct`` projects with ``[u, v, 1]^T ~ K (R p_ct + t)``. For a flat panel
``fx = sdd_mm / pixel_spacing_u_mm`` and ``fy = sdd_mm / pixel_spacing_v_mm``.
Scaling an image by ``s`` (``s < 1`` shrinks) keeps the pixel-centre convention:
``u' = s (u + 0.5) - 0.5``.

Tensors
-------
Batch dimension first. Functions accept float32 or float64 and return the dtype and device of
their inputs; nothing is moved to a device implicitly.
"""

from .se3 import (
    hat,
    invert_transform,
    make_transform,
    matrix_from_quaternion,
    pose_m_to_transform,
    quaternion_from_matrix,
    rotate_vectors,
    se3_exp,
    se3_log,
    so3_exp,
    so3_log,
    transform_points,
    transform_to_pose_m,
)
from .camera import (
    CArmIntrinsics,
    backproject_pixels,
    carm_pose,
    pixel_grid,
    pixel_rays_optical,
    project_points,
    scale_intrinsics,
    source_position_ct,
)

__all__ = [
    "hat",
    "invert_transform",
    "make_transform",
    "matrix_from_quaternion",
    "pose_m_to_transform",
    "quaternion_from_matrix",
    "rotate_vectors",
    "se3_exp",
    "se3_log",
    "so3_exp",
    "so3_log",
    "transform_points",
    "transform_to_pose_m",
    "CArmIntrinsics",
    "backproject_pixels",
    "carm_pose",
    "pixel_grid",
    "pixel_rays_optical",
    "project_points",
    "scale_intrinsics",
    "source_position_ct",
]
