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


def export_onnx(net, example, path, input_name: str = "image", output_name: str = "output") -> Path:
    """Export a network to ONNX (opset 17, fixed input shape of ``example``).

    Parameters
    ----------
    net : torch.nn.Module
        The network (put in eval mode for the export).
    example : torch.Tensor
        ``(B, C, H, W)`` float32 example input on the network's device.
    """
    import warnings

    import torch

    net = net.eval()
    p = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (example,), str(p), input_names=[input_name], output_names=[output_name], dynamo=False, opset_version=17)
    return p


def make_runner(onnx_path, backend: str, device: str):
    """An inference function ``(B, C, H, W) float32 numpy -> first output numpy`` for an ONNX graph.

    ``backend`` is a resolved back-end (:func:`resolve_backend`): ``onnxruntime`` runs the graph
    with ONNX Runtime (CUDA provider on ``cuda`` when present); ``tensorrt`` builds a TensorRT
    engine from it (FP16 where the GPU supports it) and runs it; ``pytorch`` returns None (the
    caller runs its own module).
    """
    if backend == "pytorch":
        return None
    p = Path(onnx_path)
    if not p.is_file():
        raise ModelLoadError(f"back-end {backend} needs the ONNX graph {str(p)!r}, which does not exist (re-run the preparation)")
    if backend == "onnxruntime":
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            sess = ort.InferenceSession(str(p), providers=providers)
        except Exception as exc:
            raise ModelLoadError(f"ONNX Runtime cannot load {str(p)!r}: {str(exc).splitlines()[0][:200]}") from None
        name = sess.get_inputs()[0].name
        return lambda x: sess.run(None, {name: x})[0]
    if backend == "tensorrt":  # pragma: no cover - needs TensorRT and a GPU
        return _tensorrt_runner(p)
    raise ConfigError(f"unknown back-end {backend!r}")


def _tensorrt_runner(onnx_path: Path):  # pragma: no cover - needs TensorRT and a GPU
    """Build a TensorRT engine from ONNX and return an inference function (I/O through torch CUDA tensors)."""
    import tensorrt as trt
    import torch

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        raise ModelLoadError(f"TensorRT cannot parse {str(onnx_path)!r}: {parser.get_error(0)}")
    config = builder.create_builder_config()
    if builder.platform_has_fast_fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ModelLoadError(f"TensorRT could not build an engine from {str(onnx_path)!r}")
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inp = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
    out = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)

    def run(x):
        xt = torch.as_tensor(x, device="cuda").contiguous()
        context.set_input_shape(inp, tuple(xt.shape))
        yt = torch.empty(tuple(context.get_tensor_shape(out)), dtype=torch.float32, device="cuda")
        context.set_tensor_address(inp, xt.data_ptr())
        context.set_tensor_address(out, yt.data_ptr())
        stream = torch.cuda.current_stream()
        context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        return yt.cpu().numpy()

    return run
