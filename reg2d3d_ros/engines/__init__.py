"""Inference back-ends (TensorRT, PyTorch, ONNX Runtime) and model files.

The learned components (SCR initialiser, PPC-L weights, PPC Flow network and attention) run
through :func:`load` (:mod:`.runtime`: one interface, three back-ends, fall-backs, ONNX export,
TensorRT engine cache); each method registers the format of its model files
(:func:`register_format`), so this package depends on no method. This module also answers which back-end and device a configuration
means and checks model files *before* anything depends on them, so that a corrupt or
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
from .runtime import (BACKENDS, OPSET, Engine, NetworkSpec, cache_dir, candidates, export_network, file_sha256, load, model_files,
                      networks_of, onnx_path_for, point_network_spec, register_format, registered_formats, trt_cache_key)

__all__ = ["BACKENDS", "DEVICES", "MODEL_SUFFIXES", "OPSET", "Engine", "NetworkSpec", "available_backends", "cache_dir", "candidates",
           "check_model_file", "check_models_dir", "cuda_available", "export_network", "file_sha256", "load", "model_files", "networks_of",
           "onnx_path_for", "point_network_spec", "read_model_blob", "register_format", "registered_formats", "resolve_backend", "resolve_device",
           "trt_cache_key"]

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
    """The back-end a configuration will get (:func:`.runtime.candidates` order, first available one).

    An explicit back-end that is not available here is a warning (logger ``reg2d3d_ros.engines``)
    and the next one in the ``auto`` order is used, never an error: the node still runs.
    """
    import logging

    resolve_device(device)
    avail = available_backends()
    order = candidates(backend, device)
    got = next(be for be, _ in order if be in avail)
    if backend != "auto" and got != backend:
        logging.getLogger("reg2d3d_ros.engines").warning(f"back-end {backend!r} is not available here (available: {', '.join(avail)}); using {got!r}")
    return got


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


def read_model_blob(path, fmt: str, version: int, what: str, hint: str) -> dict:
    """Read one of this project's ``.pt`` model files (``torch.load(weights_only=True)``) and check its header.

    Parameters
    ----------
    path : str or Path
        The file.
    fmt, version : str, int
        Expected ``format`` and ``version`` entries.
    what : str
        Name of the model in messages (e.g. ``"SCR model"``).
    hint : str
        How to create the file (said when it is missing or unreadable).

    Raises
    ------
    ModelLoadError
        Missing, unreadable, foreign or other-version file.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{what} {path} does not exist ({hint})")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt files
        raise ModelLoadError(f"{what} {path} cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}); "
                             f"re-create it ({hint})") from None
    if not isinstance(blob, dict) or blob.get("format") != fmt:
        found = blob.get("format") if isinstance(blob, dict) else type(blob).__name__
        article = "an" if what[:1] in "AEFHILMNORSX" else "a"  # spoken initials: an SCR model, a PPC-L model
        raise ModelLoadError(f"{path} is not {article} {what} of reg2d3d_ros (format {found})")
    if blob.get("version") != version:
        raise ModelLoadError(f"{what} {path} has version {blob.get('version')}, this software reads version {version}")
    return blob


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
