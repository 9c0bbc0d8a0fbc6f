"""C-arm intrinsics, C-arm poses, projection and back-projection.

Conventions: :mod:`reg2d3d_ros.geometry`. Anatomical C-arm angles (:func:`carm_pose`) assume a
supine patient whose CT frame is LPS: at ``lao_deg = cran_deg = 0`` the source is posterior,
the beam runs posterior to anterior (optical +z = CT -y), image rows run superior to inferior
(optical +y = CT -z) and columns towards the patient's right (optical +x = CT -x).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ..errors import ConfigError
from .se3 import make_transform


@dataclass(frozen=True)
class CArmIntrinsics:
    """Pinhole intrinsics of a flat-panel C-arm in pixels.

    Attributes
    ----------
    width, height : int
        Image size in pixels (columns, rows).
    fx, fy : float
        Focal lengths in pixels (``sdd_mm / pixel_spacing_mm``).
    cx, cy : float
        Principal point in pixels (pixel-centre convention, first pixel centre at 0).
    pixel_spacing_mm : float or None
        Detector pixel pitch in mm (columns); ``None`` when only ``K`` is known (camera_info).
    """

    width: int
    height: int
    fx: float
    fy: float
    cx: float
    cy: float
    pixel_spacing_mm: float | None = None

    def __post_init__(self):
        if self.width <= 0 or self.height <= 0:
            raise ConfigError(f"image size must be positive, got {self.width}x{self.height}")
        if not (self.fx > 0 and self.fy > 0 and math.isfinite(self.fx) and math.isfinite(self.fy)):
            raise ConfigError(f"focal lengths must be positive and finite, got fx={self.fx}, fy={self.fy}")
        if not (math.isfinite(self.cx) and math.isfinite(self.cy)):
            raise ConfigError("principal point must be finite")

    @classmethod
    def from_detector(
        cls,
        sdd_mm: float,
        pixel_spacing_mm: float,
        width: int,
        height: int,
        cx: float | None = None,
        cy: float | None = None,
    ) -> "CArmIntrinsics":
        """Intrinsics of a flat panel from source-to-detector distance and pixel pitch.

        Parameters
        ----------
        sdd_mm : float
            Source (focal spot) to detector distance along the principal ray, mm.
        pixel_spacing_mm : float
            Detector pixel pitch, mm (square pixels).
        width, height : int
            Image size in pixels.
        cx, cy : float, optional
            Principal point in pixels; default: the image centre ``((W-1)/2, (H-1)/2)``.
        """
        if sdd_mm <= 0 or pixel_spacing_mm <= 0:
            raise ConfigError(f"sdd_mm and pixel_spacing_mm must be positive, got {sdd_mm}, {pixel_spacing_mm}")
        f = sdd_mm / pixel_spacing_mm
        return cls(
            width=int(width),
            height=int(height),
            fx=f,
            fy=f,
            cx=(width - 1) / 2.0 if cx is None else float(cx),
            cy=(height - 1) / 2.0 if cy is None else float(cy),
            pixel_spacing_mm=float(pixel_spacing_mm),
        )

    @classmethod
    def from_camera_info(cls, k, width: int, height: int, pixel_spacing_mm: float | None = None) -> "CArmIntrinsics":
        """Intrinsics from ``sensor_msgs/CameraInfo`` fields given as plain values.

        Parameters
        ----------
        k : sequence of 9 float
            Row-major ``K`` of the message.
        width, height : int
            Image size of the message.
        pixel_spacing_mm : float, optional
            Detector pitch if known (CameraInfo does not carry it).
        """
        k = [float(x) for x in k]
        if len(k) != 9:
            raise ConfigError(f"camera_info K must have 9 values, got {len(k)}")
        if k[1] != 0.0 or k[3] != 0.0 or k[6] != 0.0 or k[7] != 0.0 or k[8] != 1.0:
            raise ConfigError(f"camera_info K is not a pinhole matrix [[fx,0,cx],[0,fy,cy],[0,0,1]]: {k}")
        return cls(int(width), int(height), k[0], k[4], k[2], k[5], pixel_spacing_mm)

    @property
    def sdd_mm(self) -> float | None:
        """Source-to-detector distance in mm, if the pixel pitch is known."""
        return None if self.pixel_spacing_mm is None else self.fx * self.pixel_spacing_mm

    def K(self, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
        """Intrinsic matrix ``(3, 3)`` in pixels."""
        return torch.tensor(
            [[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]], dtype=dtype, device=device
        )

    def scaled(self, factor: float) -> "CArmIntrinsics":
        """Intrinsics of the image resized by ``factor`` (e.g. 0.25 for a quarter-size level).

        The new size is ``round(W * factor)``; the principal point keeps the pixel-centre
        convention (``c' = factor (c + 0.5) - 0.5``). The effective factor per axis is
        ``new_size / old_size`` so that the image borders stay aligned.
        """
        if factor <= 0:
            raise ConfigError(f"scale factor must be positive, got {factor}")
        w = max(1, int(round(self.width * factor)))
        h = max(1, int(round(self.height * factor)))
        su, sv = w / self.width, h / self.height
        return replace(
            self,
            width=w,
            height=h,
            fx=self.fx * su,
            fy=self.fy * sv,
            cx=su * (self.cx + 0.5) - 0.5,
            cy=sv * (self.cy + 0.5) - 0.5,
            pixel_spacing_mm=None if self.pixel_spacing_mm is None else self.pixel_spacing_mm / su,
        )

    def to_camera_info(self) -> dict:
        """Plain ``sensor_msgs/CameraInfo`` fields: ``width, height, distortion_model, d, k, r, p``."""
        k = [self.fx, 0.0, self.cx, 0.0, self.fy, self.cy, 0.0, 0.0, 1.0]
        return {
            "width": self.width,
            "height": self.height,
            "distortion_model": "plumb_bob",
            "d": [0.0, 0.0, 0.0, 0.0, 0.0],
            "k": k,
            "r": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0],
            "p": [self.fx, 0.0, self.cx, 0.0, 0.0, self.fy, self.cy, 0.0, 0.0, 0.0, 1.0, 0.0],
        }


def scale_intrinsics(K: torch.Tensor, factor: float) -> torch.Tensor:
    """Scale intrinsic matrices for an image resized by ``factor`` (pixel-centre convention).

    Parameters
    ----------
    K : torch.Tensor
        ``(..., 3, 3)`` intrinsics in pixels.
    factor : float
        Resize factor (``< 1`` shrinks).

    Returns
    -------
    torch.Tensor
        ``(..., 3, 3)`` scaled intrinsics.
    """
    S = torch.tensor(
        [[factor, 0.0, 0.5 * factor - 0.5], [0.0, factor, 0.5 * factor - 0.5], [0.0, 0.0, 1.0]],
        dtype=K.dtype,
        device=K.device,
    )
    return S @ K


def _rot_x(a: float) -> torch.Tensor:
    c, s = math.cos(a), math.sin(a)
    return torch.tensor([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]], dtype=torch.float64)


def _rot_z(a: float) -> torch.Tensor:
    c, s = math.cos(a), math.sin(a)
    return torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)


def carm_pose(
    isocenter_ct_mm,
    sid_mm: float,
    lao_deg: float = 0.0,
    cran_deg: float = 0.0,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """``T_optical_from_ct`` of a C-arm around a supine patient, from anatomical angles.

    Parameters
    ----------
    isocenter_ct_mm : sequence of 3 float or torch.Tensor ``(3,)``
        Isocentre (the point on the principal ray at ``sid_mm`` from the source), CT frame, mm.
    sid_mm : float
        Source-to-isocentre distance, mm.
    lao_deg : float
        Primary angle: positive = LAO (detector towards the patient's left), negative = RAO.
    cran_deg : float
        Secondary angle: positive = cranial (detector towards the head), negative = caudal.
    dtype : torch.dtype
        Output dtype.

    Returns
    -------
    torch.Tensor
        ``(4, 4)`` transform ``T_optical_from_ct`` in mm.
    """
    # Optical axes expressed in CT (LPS) coordinates at AP (columns of axes_ct).
    axes_ap = torch.tensor([[-1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, -1.0, 0.0]], dtype=torch.float64).T
    axes_ct = _rot_z(math.radians(lao_deg)) @ _rot_x(-math.radians(cran_deg)) @ axes_ap
    R = axes_ct.T  # optical_from_ct
    iso = torch.as_tensor(isocenter_ct_mm, dtype=torch.float64).reshape(3)
    source_ct = iso - sid_mm * axes_ct[:, 2]
    t = -(R @ source_ct)
    return make_transform(R, t).to(dtype)


def source_position_ct(T_optical_from_ct: torch.Tensor) -> torch.Tensor:
    """X-ray source (focal spot) position in the CT frame.

    Parameters
    ----------
    T_optical_from_ct : torch.Tensor
        ``(..., 4, 4)`` poses, mm.

    Returns
    -------
    torch.Tensor
        ``(..., 3)`` source positions, CT frame, mm.
    """
    R = T_optical_from_ct[..., :3, :3]
    t = T_optical_from_ct[..., :3, 3:4]
    return -(R.transpose(-1, -2) @ t)[..., 0]


def project_points(K: torch.Tensor, T_optical_from_ct: torch.Tensor, pts_ct_mm: torch.Tensor):
    """Project CT points to pixels.

    Parameters
    ----------
    K : torch.Tensor
        ``(..., 3, 3)`` intrinsics, pixels.
    T_optical_from_ct : torch.Tensor
        ``(..., 4, 4)`` poses, mm.
    pts_ct_mm : torch.Tensor
        ``(..., N, 3)`` points, CT frame, mm.

    Returns
    -------
    uv_px : torch.Tensor
        ``(..., N, 2)`` pixel positions ``(u, v)``.
    depth_mm : torch.Tensor
        ``(..., N)`` optical-frame ``z`` of each point, mm (positive in front of the source).
    """
    p = pts_ct_mm @ T_optical_from_ct[..., :3, :3].transpose(-1, -2) + T_optical_from_ct[..., None, :3, 3]
    z = p[..., 2]
    q = p @ K.transpose(-1, -2)
    uv = q[..., :2] / q[..., 2:3]
    return uv, z


def backproject_pixels(K: torch.Tensor, uv_px: torch.Tensor, depth_mm: torch.Tensor) -> torch.Tensor:
    """Points in the optical frame at given pixels and depths (inverse of projection).

    Parameters
    ----------
    K : torch.Tensor
        ``(..., 3, 3)`` intrinsics, pixels.
    uv_px : torch.Tensor
        ``(..., N, 2)`` pixel positions.
    depth_mm : torch.Tensor
        ``(..., N)`` optical ``z`` of each point, mm.

    Returns
    -------
    torch.Tensor
        ``(..., N, 3)`` points, optical frame, mm.
    """
    ones = torch.ones_like(uv_px[..., :1])
    rays = torch.cat([uv_px, ones], dim=-1) @ torch.linalg.inv(K).transpose(-1, -2)  # z = 1
    return rays * depth_mm[..., None]


def pixel_grid(height: int, width: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Pixel centres ``(H, W, 2)`` as ``(u, v)`` = (column, row)."""
    v, u = torch.meshgrid(
        torch.arange(height, dtype=dtype, device=device),
        torch.arange(width, dtype=dtype, device=device),
        indexing="ij",
    )
    return torch.stack([u, v], dim=-1)


def pixel_rays_optical(K: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Unit ray directions through every pixel centre, optical frame.

    Parameters
    ----------
    K : torch.Tensor
        ``(..., 3, 3)`` intrinsics, pixels.
    height, width : int
        Image size.

    Returns
    -------
    torch.Tensor
        ``(..., H*W, 3)`` unit vectors, row-major pixel order, dtype/device of ``K``.
    """
    uv = pixel_grid(height, width, dtype=K.dtype, device=K.device).reshape(-1, 2)
    ones = torch.ones_like(uv[:, :1])
    d = torch.cat([uv, ones], dim=-1) @ torch.linalg.inv(K).transpose(-1, -2)
    return d / torch.linalg.norm(d, dim=-1, keepdim=True)
