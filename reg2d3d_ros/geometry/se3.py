"""SE(3) and SO(3) helpers in batched torch (conventions: :mod:`reg2d3d_ros.geometry`)."""

from __future__ import annotations

import torch

# Below this angle (rad) the series expansions are used; with three terms their truncation error
# is below 1e-13, and above it the closed forms have no catastrophic cancellation in float32.
_SMALL = 0.05


def hat(w: torch.Tensor) -> torch.Tensor:
    """Skew-symmetric matrix of a vector.

    Parameters
    ----------
    w : torch.Tensor
        ``(..., 3)`` vectors, any float dtype.

    Returns
    -------
    torch.Tensor
        ``(..., 3, 3)`` matrices ``W`` with ``W x = w x x`` (cross product).
    """
    zero = torch.zeros_like(w[..., 0])
    wx, wy, wz = w[..., 0], w[..., 1], w[..., 2]
    return torch.stack(
        [
            torch.stack([zero, -wz, wy], dim=-1),
            torch.stack([wz, zero, -wx], dim=-1),
            torch.stack([-wy, wx, zero], dim=-1),
        ],
        dim=-2,
    )


def _exp_coefficients(theta: torch.Tensor):
    """Return a = sin(t)/t, b = (1 - cos t)/t^2, c = (t - sin t)/t^3, stable in float32 and float64."""
    small = theta < _SMALL
    t = torch.where(small, torch.ones_like(theta), theta)
    t2s = theta * theta
    half = 0.5 * t
    a = torch.where(small, 1.0 - t2s / 6.0 + t2s * t2s / 120.0, torch.sin(t) / t)
    b = torch.where(small, 0.5 - t2s / 24.0 + t2s * t2s / 720.0, 0.5 * (torch.sin(half) / half) ** 2)
    c = torch.where(small, 1.0 / 6.0 - t2s / 120.0 + t2s * t2s / 5040.0, (t - torch.sin(t)) / (t * t * t))
    return a, b, c


def so3_exp(w: torch.Tensor) -> torch.Tensor:
    """Rotation matrix of a rotation vector (Rodrigues).

    Parameters
    ----------
    w : torch.Tensor
        ``(..., 3)`` rotation vectors in radians.

    Returns
    -------
    torch.Tensor
        ``(..., 3, 3)`` rotation matrices, dtype and device of ``w``.
    """
    theta = torch.linalg.norm(w, dim=-1)
    a, b, _ = _exp_coefficients(theta)
    W = hat(w)
    eye = torch.eye(3, dtype=w.dtype, device=w.device).expand(W.shape)
    return eye + a[..., None, None] * W + b[..., None, None] * (W @ W)


def quaternion_from_matrix(R: torch.Tensor) -> torch.Tensor:
    """Unit quaternion of a rotation matrix, ROS order ``(x, y, z, w)``, with ``w >= 0``.

    Parameters
    ----------
    R : torch.Tensor
        ``(..., 3, 3)`` rotation matrices.

    Returns
    -------
    torch.Tensor
        ``(..., 4)`` quaternions ``(x, y, z, w)``.
    """
    m00, m01, m02 = R[..., 0, 0], R[..., 0, 1], R[..., 0, 2]
    m10, m11, m12 = R[..., 1, 0], R[..., 1, 1], R[..., 1, 2]
    m20, m21, m22 = R[..., 2, 0], R[..., 2, 1], R[..., 2, 2]
    # Four candidate solutions; the one with the largest pivot is numerically best.
    pivots = torch.stack(
        [
            1.0 + m00 + m11 + m22,  # 4 w^2
            1.0 + m00 - m11 - m22,  # 4 x^2
            1.0 - m00 + m11 - m22,  # 4 y^2
            1.0 - m00 - m11 + m22,  # 4 z^2
        ],
        dim=-1,
    )
    s = 2.0 * torch.sqrt(torch.clamp(pivots, min=1e-12))  # 4 * component
    cand = torch.stack(
        [
            torch.stack([(m21 - m12) / s[..., 0], (m02 - m20) / s[..., 0], (m10 - m01) / s[..., 0], s[..., 0] / 4], -1),
            torch.stack([s[..., 1] / 4, (m01 + m10) / s[..., 1], (m02 + m20) / s[..., 1], (m21 - m12) / s[..., 1]], -1),
            torch.stack([(m01 + m10) / s[..., 2], s[..., 2] / 4, (m12 + m21) / s[..., 2], (m02 - m20) / s[..., 2]], -1),
            torch.stack([(m02 + m20) / s[..., 3], (m12 + m21) / s[..., 3], s[..., 3] / 4, (m10 - m01) / s[..., 3]], -1),
        ],
        dim=-2,
    )  # (..., 4 candidates, 4 components)
    best = torch.argmax(pivots, dim=-1)
    q = torch.gather(cand, -2, best[..., None, None].expand(*best.shape, 1, 4)).squeeze(-2)
    q = q / torch.linalg.norm(q, dim=-1, keepdim=True)
    return torch.where(q[..., 3:4] < 0, -q, q)


def matrix_from_quaternion(q: torch.Tensor) -> torch.Tensor:
    """Rotation matrix of a quaternion in ROS order ``(x, y, z, w)`` (normalised first).

    Parameters
    ----------
    q : torch.Tensor
        ``(..., 4)`` quaternions, need not be unit length (must be non-zero).

    Returns
    -------
    torch.Tensor
        ``(..., 3, 3)`` rotation matrices.
    """
    q = q / torch.linalg.norm(q, dim=-1, keepdim=True)
    x, y, z, w = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    return torch.stack(
        [
            torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
            torch.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
            torch.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
        ],
        dim=-2,
    )


def so3_log(R: torch.Tensor) -> torch.Tensor:
    """Rotation vector of a rotation matrix (inverse of :func:`so3_exp`), angle in ``[0, pi]``.

    Parameters
    ----------
    R : torch.Tensor
        ``(..., 3, 3)`` rotation matrices.

    Returns
    -------
    torch.Tensor
        ``(..., 3)`` rotation vectors in radians.
    """
    q = quaternion_from_matrix(R)  # w >= 0, so the angle is in [0, pi]
    qv, qw = q[..., :3], q[..., 3]
    sin_half = torch.linalg.norm(qv, dim=-1)
    theta = 2.0 * torch.atan2(sin_half, qw)
    small = sin_half < 1e-8
    # theta / sin(theta/2) -> 2 / qw as theta -> 0
    scale = torch.where(small, 2.0 / qw.clamp(min=1e-12), theta / torch.where(small, torch.ones_like(sin_half), sin_half))
    return qv * scale[..., None]


def make_transform(R: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Assemble homogeneous transforms.

    Parameters
    ----------
    R : torch.Tensor
        ``(..., 3, 3)`` rotations.
    t : torch.Tensor
        ``(..., 3)`` translations (unit of the caller, usually mm).

    Returns
    -------
    torch.Tensor
        ``(..., 4, 4)`` transforms ``[[R, t], [0, 1]]``.
    """
    batch = torch.broadcast_shapes(R.shape[:-2], t.shape[:-1])
    T = torch.zeros(*batch, 4, 4, dtype=R.dtype, device=R.device)
    T[..., :3, :3] = R
    T[..., :3, 3] = t
    T[..., 3, 3] = 1.0
    return T


def se3_exp(xi: torch.Tensor) -> torch.Tensor:
    """SE(3) exponential of twists ``(wx, wy, wz [rad], vx, vy, vz [mm])``.

    Parameters
    ----------
    xi : torch.Tensor
        ``(..., 6)`` twists.

    Returns
    -------
    torch.Tensor
        ``(..., 4, 4)`` rigid transforms (translation in the unit of ``v``).
    """
    w, v = xi[..., :3], xi[..., 3:]
    theta = torch.linalg.norm(w, dim=-1)
    a, b, c = _exp_coefficients(theta)
    W = hat(w)
    W2 = W @ W
    eye = torch.eye(3, dtype=xi.dtype, device=xi.device).expand(W.shape)
    R = eye + a[..., None, None] * W + b[..., None, None] * W2
    V = eye + b[..., None, None] * W + c[..., None, None] * W2
    t = (V @ v[..., None])[..., 0]
    return make_transform(R, t)


def se3_log(T: torch.Tensor) -> torch.Tensor:
    """SE(3) logarithm: twists ``(..., 6)`` of transforms ``(..., 4, 4)`` (inverse of :func:`se3_exp`).

    Parameters
    ----------
    T : torch.Tensor
        ``(..., 4, 4)`` rigid transforms.

    Returns
    -------
    torch.Tensor
        ``(..., 6)`` twists ``(w [rad], v [unit of t])``.
    """
    w = so3_log(T[..., :3, :3])
    theta = torch.linalg.norm(w, dim=-1)
    W = hat(w)
    small = theta < _SMALL
    t_safe = torch.where(small, torch.ones_like(theta), theta)
    # V^-1 = I - W/2 + d W^2, d = (1 - (t/2) cot(t/2)) / t^2
    half = 0.5 * t_safe
    t2s = theta * theta
    d = torch.where(
        small,
        1.0 / 12.0 + t2s / 720.0 + t2s * t2s / 30240.0,
        (1.0 - half * torch.cos(half) / torch.sin(half)) / t_safe**2,
    )
    eye = torch.eye(3, dtype=T.dtype, device=T.device).expand(W.shape)
    V_inv = eye - 0.5 * W + d[..., None, None] * (W @ W)
    v = (V_inv @ T[..., :3, 3:4])[..., 0]
    return torch.cat([w, v], dim=-1)


def invert_transform(T: torch.Tensor) -> torch.Tensor:
    """Inverse of rigid transforms using ``R^T`` (no general matrix inverse).

    Parameters
    ----------
    T : torch.Tensor
        ``(..., 4, 4)`` rigid transforms ``T_a_from_b``.

    Returns
    -------
    torch.Tensor
        ``(..., 4, 4)`` transforms ``T_b_from_a``.
    """
    R_t = T[..., :3, :3].transpose(-1, -2)
    t = -(R_t @ T[..., :3, 3:4])[..., 0]
    return make_transform(R_t, t)


def transform_points(T: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    """Apply rigid transforms to points.

    Parameters
    ----------
    T : torch.Tensor
        ``(..., 4, 4)`` transforms ``T_a_from_b``; leading dims broadcast against ``pts``'.
    pts : torch.Tensor
        ``(..., N, 3)`` points in frame ``b``.

    Returns
    -------
    torch.Tensor
        ``(..., N, 3)`` points in frame ``a``.
    """
    return pts @ T[..., :3, :3].transpose(-1, -2) + T[..., None, :3, 3]


def rotate_vectors(T: torch.Tensor, vecs: torch.Tensor) -> torch.Tensor:
    """Rotate direction vectors (no translation) by the rotation part of ``T``.

    Parameters
    ----------
    T : torch.Tensor
        ``(..., 4, 4)`` transforms (or ``(..., 3, 3)`` rotations).
    vecs : torch.Tensor
        ``(..., N, 3)`` vectors.

    Returns
    -------
    torch.Tensor
        ``(..., N, 3)`` rotated vectors.
    """
    return vecs @ T[..., :3, :3].transpose(-1, -2)


def transform_to_pose_m(T_mm: torch.Tensor):
    """ROS pose fields of transforms in mm: position in metres and quaternion ``(x, y, z, w)``.

    Parameters
    ----------
    T_mm : torch.Tensor
        ``(..., 4, 4)`` rigid transforms, translation in mm.

    Returns
    -------
    position_m : torch.Tensor
        ``(..., 3)`` translation in metres.
    quat_xyzw : torch.Tensor
        ``(..., 4)`` unit quaternion, ``w >= 0``.
    """
    return T_mm[..., :3, 3] / 1000.0, quaternion_from_matrix(T_mm[..., :3, :3])


def pose_m_to_transform(position_m: torch.Tensor, quat_xyzw: torch.Tensor) -> torch.Tensor:
    """Transforms ``(..., 4, 4)`` in mm from ROS pose fields (metres, quaternion ``(x, y, z, w)``)."""
    return make_transform(matrix_from_quaternion(quat_xyzw), position_m * 1000.0)
