"""X-ray frame encodings (``sensor_msgs/Image`` fields as plain values) and intensity conventions.

Supported encodings: ``mono8``, ``mono16`` and ``32FC1`` (the interface contract). Decoding
checks the fields the way a node must before trusting a frame, and raises
:class:`~reg2d3d_ros.errors.ImageError` with a message a user can act on.

Intensity conventions (parameter ``intensity``):

``attenuation``
    bright = more material along the ray (a DRR, or a log-converted, inverted radiograph);
``transmission``
    bright = more photons reached the detector (a raw detector image).

:func:`to_attenuation` maps either to an attenuation-like image (the registration works on it).
"""

from __future__ import annotations

import numpy as np

from .errors import ImageError

ENCODINGS = {"mono8": (np.uint8, 1), "mono16": (np.uint16, 2), "32FC1": (np.float32, 4)}
INTENSITIES = ("attenuation", "transmission")


def encode_image(img: np.ndarray, encoding: str):
    """Pack an ``(H, W)`` array into ``sensor_msgs/Image`` fields (little endian).

    Parameters
    ----------
    img : np.ndarray
        ``(H, W)`` values already in the encoding's range (uint8, uint16 or float32).
    encoding : str
        ``mono8``, ``mono16`` or ``32FC1``.

    Returns
    -------
    dict
        ``height, width, encoding, is_bigendian, step, data`` (``data`` is ``bytes``).
    """
    if encoding not in ENCODINGS:
        raise ImageError(f"unsupported encoding {encoding!r}; use one of {sorted(ENCODINGS)}")
    dtype, size = ENCODINGS[encoding]
    arr = np.ascontiguousarray(img, dtype=np.dtype(dtype).newbyteorder("<"))
    if arr.ndim != 2:
        raise ImageError(f"image must be 2-D (H, W), got shape {arr.shape}")
    h, w = arr.shape
    return {"height": h, "width": w, "encoding": encoding, "is_bigendian": 0, "step": w * size, "data": arr.tobytes()}


def decode_image(encoding: str, height: int, width: int, step: int, data, is_bigendian: int = 0) -> np.ndarray:
    """Unpack ``sensor_msgs/Image`` fields into a float32 ``(H, W)`` array of raw pixel values.

    Raises
    ------
    ImageError
        Unsupported encoding, inconsistent size/step/data length, NaN/inf or constant pixels.
    """
    if encoding not in ENCODINGS:
        raise ImageError(
            f"unsupported image encoding {encoding!r}: the node accepts {', '.join(sorted(ENCODINGS))} "
            "(grey-level X-ray frames)"
        )
    dtype, size = ENCODINGS[encoding]
    if height <= 0 or width <= 0:
        raise ImageError(f"image has no pixels ({width}x{height})")
    if step < width * size:
        raise ImageError(f"image step {step} is smaller than width*{size} = {width * size}")
    buf = memoryview(data).cast("B") if not isinstance(data, np.ndarray) else data.reshape(-1).view(np.uint8)
    if len(buf) < step * height:
        raise ImageError(f"image data has {len(buf)} bytes, expected step*height = {step * height}")
    raw = np.frombuffer(buf, dtype=np.uint8, count=step * height).reshape(height, step)[:, : width * size]
    dt = np.dtype(dtype).newbyteorder(">" if is_bigendian else "<")
    arr = raw.copy().view(dt).reshape(height, width).astype(np.float32)
    if not np.all(np.isfinite(arr)):
        raise ImageError("image contains NaN or infinite pixels")
    if float(arr.max()) == float(arr.min()):
        raise ImageError(f"image is constant (all pixels = {float(arr.min())}); no anatomy to register")
    return arr


def to_attenuation(img: np.ndarray, intensity: str) -> np.ndarray:
    """Attenuation-like float32 image: bright = more material along the ray.

    ``transmission`` frames are log-converted (``-log(I / I_ref)``, with ``I_ref`` the 99.9th
    percentile, so unattenuated pixels map to about 0); ``attenuation`` frames are returned as
    float32 unchanged.
    """
    if intensity not in INTENSITIES:
        raise ImageError(f"intensity must be one of {INTENSITIES}, got {intensity!r}")
    img = np.asarray(img, dtype=np.float32)
    if intensity == "attenuation":
        return img
    ref = float(np.percentile(img, 99.9))
    floor = max(ref * 1e-4, 1e-6)
    return -np.log(np.clip(img, floor, None) / max(ref, floor)).astype(np.float32)
