"""Inference back-ends (TensorRT, ONNX Runtime, PyTorch) and model files.

The learned components (SCR initialiser, learned PPC weights and flow) run through one of three
back-ends: ``tensorrt`` where a CUDA GPU and TensorRT exist, ``onnxruntime`` and ``pytorch``
everywhere. ``auto`` picks the first available in that order. This module answers which back-end
and device to use and checks model files *before* anything depends on them, so that a corrupt or
incompatible file is one clear :class:`~reg2d3d_ros.errors.ModelLoadError` at start-up instead of
a traceback mid-operation.

Model files in a models folder are recognised by suffix:

``.onnx``
    ONNX graphs (checked with ``onnx.checker``; ONNX Runtime and TensorRT build from them);
``.pt`` / ``.pth``
    PyTorch state dictionaries (loaded with ``weights_only=True``: no code is executed);
``.engine`` / ``.plan``
    serialised TensorRT engines (device- and version-specific; only checked where TensorRT exists).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import ConfigError, ModelLoadError

BACKENDS = ("auto", "tensorrt", "onnxruntime", "pytorch")
DEVICES = ("auto", "cpu", "cuda")
MODEL_SUFFIXES = (".onnx", ".pt", ".pth", ".engine", ".plan")


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def cuda_available() -> bool:
    """Whether PyTorch sees a CUDA device."""
    import torch

    return bool(torch.cuda.is_available())


def available_backends() -> list:
    """Back-ends usable on this machine, best first (``tensorrt`` needs TensorRT and CUDA)."""
    out = []
    if _has("tensorrt") and cuda_available():
        out.append("tensorrt")
    if _has("onnxruntime"):
        out.append("onnxruntime")
    out.append("pytorch")
    return out


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` if available else ``cpu``; an explicit ``cuda`` without a GPU is an error."""
    if device not in DEVICES:
        raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if device == "cuda" and not cuda_available():
        raise ConfigError("device 'cuda' requested but PyTorch sees no CUDA device (use 'auto' or 'cpu')")
    return device


def resolve_backend(backend: str, device: str = "auto") -> str:
    """The back-end to use: ``auto`` -> the best available one; an unavailable explicit one is an error."""
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    dev = resolve_device(device)
    avail = available_backends()
    if backend == "auto":
        return next(b for b in avail if b != "tensorrt" or dev == "cuda")
    if backend not in avail:
        why = "TensorRT and a CUDA GPU" if backend == "tensorrt" else "the Python package " + backend
        raise ConfigError(f"backend {backend!r} is not available here (it needs {why}); available: {', '.join(avail)}")
    if backend == "tensorrt" and dev != "cuda":
        raise ConfigError("backend 'tensorrt' needs device 'cuda' (or 'auto' on a machine with a GPU)")
    return backend


def check_model_file(path) -> dict:
    """Check that a model file can be read; returns ``{"path", "kind", "bytes"}``.

    Raises
    ------
    ModelLoadError
        The file is missing, empty, corrupt, of an unknown kind, or needs a back-end that is absent.
    """
    p = Path(path)
    if not p.is_file():
        raise ModelLoadError(f"model file {str(p)!r} does not exist")
    size = p.stat().st_size
    if size == 0:
        raise ModelLoadError(f"model file {str(p)!r} is empty")
    suffix = p.suffix.lower()
    if suffix not in MODEL_SUFFIXES:
        raise ModelLoadError(f"model file {str(p)!r}: unknown kind {suffix!r} (expected one of {', '.join(MODEL_SUFFIXES)})")
    try:
        if suffix == ".onnx":
            import onnx

            onnx.checker.check_model(onnx.load(str(p)))
        elif suffix in (".pt", ".pth"):
            import torch

            obj = torch.load(str(p), map_location="cpu", weights_only=True)
            if not isinstance(obj, dict):
                raise ModelLoadError(f"model file {str(p)!r} holds a {type(obj).__name__}, expected a state dictionary")
        else:  # TensorRT engine
            if not _has("tensorrt"):
                raise ModelLoadError(f"model file {str(p)!r} is a TensorRT engine but TensorRT is not installed here")
            import tensorrt as trt  # pragma: no cover - needs TensorRT

            runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
            if runtime.deserialize_cuda_engine(p.read_bytes()) is None:
                raise ModelLoadError(f"model file {str(p)!r}: TensorRT cannot deserialise it (built for another GPU or version?)")
    except ModelLoadError:
        raise
    except Exception as exc:  # any reader failure on a user's file is a corrupt/incompatible file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"model file {str(p)!r} is corrupt or incompatible: {first[:200]}") from None
    return {"path": str(p), "kind": suffix.lstrip("."), "bytes": size}


def check_models_dir(models_dir) -> list:
    """Check every model file in a folder (see :func:`check_model_file`); returns their summaries.

    An empty ``models_dir`` ('') means no folder: nothing to check. A folder that does not exist is
    an error.
    """
    if not models_dir:
        return []
    d = Path(models_dir)
    if not d.is_dir():
        raise ModelLoadError(f"models folder {str(d)!r} does not exist or is not a folder")
    return [check_model_file(f) for f in sorted(d.iterdir()) if f.suffix.lower() in MODEL_SUFFIXES]
