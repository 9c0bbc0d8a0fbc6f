"""One inference interface for every network of the node: PyTorch, ONNX Runtime and TensorRT.

Networks
--------
A model file of this project (``scr.pt``, ``ppcl.pt``, ``ppcflow.pt``; recognised by its
``format`` entry, not its name) holds one or more networks; :func:`networks_of` lists them as
:class:`NetworkSpec` (a PyTorch module, its named inputs with example shapes, which axes may
vary, its outputs). This module knows no method: each method's model module registers its file
format when it is imported (:func:`register_format`: :mod:`reg2d3d_ros.scr.model`,
:mod:`reg2d3d_ros.ppcl.model`, :mod:`reg2d3d_ros.ppcflow.model`), so whoever reads a model file
has imported its method (a file of a method that was not imported is an unknown format):

============  =======================================  =============================================
file          network names                            inputs (batch first)
============  =======================================  =============================================
SCR           ``scr``                                  ``image (1, 1, S, S)`` float32
PPC-L         ``level_0.25``, ``level_0.5``, ...       ``features (1, N, 13)`` float32, ``mask (1, N)`` bool
PPC Flow      ``flow``, ``attention`` (if trained)     ``fixed, moving (1, 2, H, W)`` float32; as PPC-L
============  =======================================  =============================================

``N`` (correspondences) and ``H, W`` (level size, multiples of 4) vary between calls.

Back-ends
---------
:func:`load` returns an :class:`Engine`, a callable on numpy arrays or torch tensors (outputs of
the same kind; torch outputs on the inputs' device, float32):

``pytorch``
    the module in eval and inference mode on CPU or CUDA (``half=True``: FP16 on CUDA);
``onnxruntime``
    the ONNX graph (CUDA provider on ``cuda`` when ONNX Runtime has it, else CPU);
``tensorrt``
    an engine built from the ONNX graph with the TensorRT Python API for the fixed input shapes
    of the call (point sets are padded to a power of two with the mask, so few shapes occur),
    FP16 when asked and supported, cached on disk under a key of the ONNX graph's hash, the GPU's
    name, the TensorRT version, the precision and the shapes (:func:`trt_cache_key`); a changed
    key builds a new engine (the first build is logged with its duration).

``auto`` is TensorRT (importable, CUDA GPU) > PyTorch on CUDA > ONNX Runtime on CPU > PyTorch
on CPU. A back-end that is missing or fails to load falls back to the next one with a warning
(logger ``reg2d3d_ros.engines``; also in :attr:`Engine.notes`); a model file that cannot be read
is a :class:`~reg2d3d_ros.errors.ModelLoadError` (the user's file, not the back-end).

ONNX graphs
-----------
Written by ``python -m reg2d3d_ros.export_models`` next to the model file
(:func:`onnx_path_for`: ``scr.onnx``, ``ppcl.level_0.25.onnx``, ``ppcflow.flow.onnx``), opset
:data:`OPSET`, with the SHA-256 of the source model file in the graph's metadata
(``source_sha256``). A graph that is missing or was exported from another file is exported
again into the cache folder (:func:`cache_dir`) at load, so ONNX Runtime and TensorRT never run a
stale graph.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, ModelLoadError

LOG = logging.getLogger("reg2d3d_ros.engines")
OPSET = 17
BACKENDS = ("auto", "tensorrt", "onnxruntime", "pytorch")


@dataclass
class NetworkSpec:
    """One network of a model file.

    Attributes
    ----------
    name : str
        Network name within the file (``scr``, ``level_0.25``, ``flow``, ``attention``).
    module : torch.nn.Module
        The network (CPU, eval mode), called with the inputs in order.
    inputs : dict
        ``{input name: example shape}`` (batch first).
    dtypes : dict
        ``{input name: "float32" | "bool"}``.
    outputs : tuple
        Output names.
    dynamic : dict
        ``{input name: {axis: axis name}}`` axes that vary between calls.
    points_axis : bool
        The inputs are point sets with a ``mask`` (padding with masked points is exact).
    """

    name: str
    module: torch.nn.Module
    inputs: dict
    dtypes: dict
    outputs: tuple
    dynamic: dict = field(default_factory=dict)
    points_axis: bool = False

    def example(self) -> tuple:
        """Example inputs (seeded random floats, all-true masks)."""
        g = torch.Generator().manual_seed(0)
        return tuple(torch.ones(s, dtype=torch.bool) if self.dtypes[n] == "bool" else torch.randn(s, generator=g) for n, s in self.inputs.items())


class _Masked(torch.nn.Module):
    """A point network called with an explicit mask (the exported graph always takes both)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, features, mask):  # noqa: D102
        return self.net(features, mask)


def point_network_spec(name: str, net, n_features: int) -> NetworkSpec:
    """:class:`NetworkSpec` of a point network ``net(features (B, N, F), mask (B, N)) -> weights (B, N)`` (``N`` varies)."""
    return NetworkSpec(name, _Masked(net).eval(), {"features": (1, 512, n_features), "mask": (1, 512)},
                       {"features": "float32", "mask": "bool"}, ("weights",),
                       {"features": {0: "batch", 1: "points"}, "mask": {0: "batch", 1: "points"}}, points_axis=True)


#: ``{format: networks function}`` of the registered model file formats (:func:`register_format`).
_FORMATS: dict = {}


def register_format(fmt: str, networks) -> None:
    """Make a model file format known: ``networks(path) -> {name: NetworkSpec}`` reads a file whose ``format`` entry is ``fmt``.

    Called by each method's model module when it is imported (the same format again replaces the reader).
    """
    _FORMATS[fmt] = networks


def registered_formats() -> tuple:
    """The model file formats registered so far, sorted."""
    return tuple(sorted(_FORMATS))


def networks_of(model_path) -> dict:
    """``{name: NetworkSpec}`` of one of this project's model files (a format registered by its method, :func:`register_format`).

    Raises
    ------
    ModelLoadError
        Missing, corrupt or foreign file.
    """
    p = Path(model_path)
    if not p.is_file():
        raise ModelLoadError(f"model file {str(p)!r} does not exist")
    try:
        fmt = torch.load(p, map_location="cpu", weights_only=True).get("format")
    except Exception as exc:
        raise ModelLoadError(f"model file {str(p)!r} cannot be read ({type(exc).__name__}); re-create or re-download it") from None
    networks = _FORMATS.get(fmt) if isinstance(fmt, str) else None
    if networks is None:
        raise ModelLoadError(f"{p} is not a model file of reg2d3d_ros (format {fmt!r})")
    return networks(p)


def model_files(models_dir) -> list:
    """This project's model files (``*.pt`` with a registered ``format``) under a folder, sorted."""
    out = []
    for f in sorted(Path(models_dir).rglob("*.pt")):
        try:
            networks_of(f)
        except ModelLoadError:
            continue
        out.append(f)
    return out


# -- files ---------------------------------------------------------------------------------------
def file_sha256(path) -> str:
    """SHA-256 (hex) of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_dir() -> Path:
    """Folder for exported graphs and TensorRT engines: ``$REG2D3D_ENGINE_CACHE`` or ``~/.cache/reg2d3d_ros/engines``."""
    return Path(os.environ.get("REG2D3D_ENGINE_CACHE") or Path.home() / ".cache" / "reg2d3d_ros" / "engines")


def onnx_path_for(model_path, name: str, n_networks: int) -> Path:
    """ONNX file of one network next to its model file (``scr.onnx``; ``ppcl.level_0.25.onnx`` for multi-network files)."""
    p = Path(model_path)
    return p.with_suffix(".onnx") if n_networks == 1 else p.with_name(f"{p.stem}.{name}.onnx")


def export_network(spec: NetworkSpec, path, source_sha256: str = "") -> Path:
    """Export one network to ONNX (opset :data:`OPSET`, dynamic axes of the spec, source hash in the metadata)."""
    import warnings

    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(spec.module.eval(), spec.example(), str(tmp), input_names=list(spec.inputs), output_names=list(spec.outputs),
                          dynamic_axes=spec.dynamic or None, opset_version=OPSET, dynamo=False)
    model = onnx.load(str(tmp))
    for k, v in (("source_sha256", source_sha256), ("network", spec.name), ("producer", "reg2d3d_ros.export_models")):
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(model, str(tmp))
    os.replace(tmp, path)  # never leave a half-written graph under the real name
    return path


def onnx_metadata(path) -> dict:
    """The metadata of an ONNX file (``source_sha256``, ``network``, ...; empty if none or unreadable)."""
    try:
        import onnx

        return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    except Exception:
        return {}


def onnx_source_sha256(path) -> str:
    """The ``source_sha256`` metadata of an ONNX file ('' if none or unreadable)."""
    return onnx_metadata(path).get("source_sha256", "")


def current_onnx(model_path, spec: NetworkSpec, n_networks: int, notes: list) -> Path:
    """An ONNX graph of ``spec`` exported from this very model file: next to it, else (re-)exported into the cache."""
    sha = file_sha256(model_path)
    want = {"source_sha256": sha, "network": spec.name}

    def current(path: Path) -> bool:
        meta = onnx_metadata(path) if path.is_file() else {}
        return all(meta.get(k) == v for k, v in want.items())

    beside = onnx_path_for(model_path, spec.name, n_networks)
    if current(beside):
        return beside
    cached = cache_dir() / "onnx" / sha[:16] / f"{spec.name}.onnx"
    if current(cached):
        return cached
    why = "is missing" if not beside.is_file() else "was exported from another model file or network"
    t0 = time.perf_counter()
    export_network(spec, cached, sha)
    _note(notes, f"{beside.name} {why}: exported {spec.name} to {cached} in {time.perf_counter() - t0:.1f} s "
                 f"(run python -m reg2d3d_ros.export_models to write it beside the model)", logging.INFO)
    return cached


class Note(str):
    """A note of an engine's set-up (:attr:`Engine.notes`): the text, with its logging ``level``.

    A fall-back or a back-end other than the one asked for is a warning; an export or a cached
    build is information. Whoever shows the notes (the node's log) uses ``level`` rather than
    reading the text.
    """

    level: int = logging.INFO

    def __new__(cls, text: str, level: int = logging.INFO):
        note = super().__new__(cls, text)
        note.level = int(level)
        return note


def _note(notes: list, msg: str, level=logging.WARNING) -> None:
    notes.append(Note(msg, level))
    LOG.log(level, msg)


# -- back-end choice ---------------------------------------------------------------------------
def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def candidates(backend: str, device: str) -> list:
    """Back-end/device pairs to try, in order, for a requested back-end and device.

    ``device`` is ``auto``, ``cpu`` or ``cuda``. ``auto``: TensorRT (importable and a GPU) > PyTorch
    CUDA > ONNX Runtime CPU > PyTorch CPU. An explicit back-end comes first, followed by the
    ``auto`` order as fall-backs. Availability is checked when loading, not here.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device must be one of auto, cpu, cuda, got {device!r}")
    gpu = device in ("auto", "cuda") and torch.cuda.is_available()
    order = []
    if gpu:
        order += [("tensorrt", "cuda"), ("pytorch", "cuda")]
    order += [("onnxruntime", "cpu"), ("pytorch", "cpu")]
    if backend != "auto":
        first = (backend, "cuda" if gpu else "cpu")
        order = [first] + [c for c in order if c != first]
    return order


# -- engines -----------------------------------------------------------------------------------
class Engine:
    """A loaded network: ``engine(*inputs)`` -> output (numpy in, numpy out; torch in, torch out).

    Attributes
    ----------
    name, backend, device : str
        Network name, the back-end and device that run it.
    notes : list of str
        Fall-backs, exports and builds that happened while loading (also logged).
    """

    def __init__(self, spec: NetworkSpec, backend: str, device: str, run, notes: list):
        self.spec = spec
        self.name = spec.name
        self.backend = backend
        self.device = device
        self._run = run
        self.notes = notes

    def __repr__(self) -> str:
        return f"Engine({self.name!r}, backend={self.backend!r}, device={self.device!r})"

    def __call__(self, *inputs):
        if len(inputs) != len(self.spec.inputs):
            raise ValueError(f"network {self.name} takes {len(self.spec.inputs)} inputs ({', '.join(self.spec.inputs)}), got {len(inputs)}")
        as_numpy = not torch.is_tensor(inputs[0])
        ref = None if as_numpy else inputs[0].device
        xs = [torch.as_tensor(np.asarray(x)) if as_numpy else x for x in inputs]
        xs = [x.bool() if self.spec.dtypes[n] == "bool" else x.float() for n, x in zip(self.spec.inputs, xs)]
        y = self._run(xs)
        return y.detach().float().cpu().numpy() if as_numpy else y.detach().float().to(ref)


def _torch_runner(spec: NetworkSpec, device: str, half: bool):
    module = spec.module.to(device).eval()
    use_half = bool(half and device == "cuda")
    if use_half:
        module = module.half()

    def run(xs):
        xs = [x.to(device) for x in xs]
        if use_half:
            xs = [x.half() if x.is_floating_point() else x for x in xs]
        with torch.inference_mode():
            return module(*xs)

    return run


def _ort_runner(onnx_path: Path, spec: NetworkSpec, device: str):
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeError("this ONNX Runtime has no CUDA provider")
        providers.insert(0, "CUDAExecutionProvider")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # no busy-waiting of ONNX Runtime's threads after a run: they would take the cores from the
    # PyTorch work (rendering, matching) that follows each network call in the update
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=providers)
    names = [i.name for i in sess.get_inputs()]
    if names != list(spec.inputs):
        raise RuntimeError(f"graph inputs {names} differ from the network's {list(spec.inputs)}")

    def run(xs):
        feeds = {n: x.cpu().numpy() for n, x in zip(names, xs)}
        return torch.from_numpy(sess.run(None, feeds)[0])

    return run


def trt_cache_key(onnx_sha256: str, gpu_name: str, trt_version: str, fp16: bool, shapes: dict) -> str:
    """Key of a TensorRT engine in the cache: changes when the graph, GPU, TensorRT, precision or shapes change."""
    blob = json.dumps({"onnx": onnx_sha256, "gpu": gpu_name, "trt": trt_version, "fp16": bool(fp16),
                       "shapes": {k: list(v) for k, v in sorted(shapes.items())}}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _pad_points(xs: list, n_to: int) -> list:
    """Pad point inputs ``(B, N, F)`` and mask ``(B, N)`` to ``n_to`` points (padding is masked out)."""
    f, m = xs
    n = f.shape[1]
    if n == n_to:
        return xs
    f = torch.cat([f, f.new_zeros(f.shape[0], n_to - n, f.shape[2])], dim=1)
    m = torch.cat([m, m.new_zeros(m.shape[0], n_to - n)], dim=1)
    return [f, m]


def _tensorrt_runner(onnx_path: Path, spec: NetworkSpec, fp16: bool, notes: list):  # pragma: no cover - needs TensorRT and a GPU
    """TensorRT engines of one graph, one per input shape, built or read from the engine cache."""
    import tensorrt as trt

    if not torch.cuda.is_available():
        raise RuntimeError("TensorRT needs a CUDA GPU")
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    onnx_bytes = onnx_path.read_bytes()
    onnx_sha = hashlib.sha256(onnx_bytes).hexdigest()
    gpu = torch.cuda.get_device_name()
    contexts = {}

    def engine_for(shapes: dict):
        key = trt_cache_key(onnx_sha, gpu, trt.__version__, fp16, shapes)
        if key in contexts:
            return contexts[key]
        path = cache_dir() / "tensorrt" / f"{spec.name}-{key}.engine"
        engine = None
        if path.is_file():
            engine = runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                _note(notes, f"cached TensorRT engine {path} cannot be read: rebuilding it")
        if engine is None:
            t0 = time.perf_counter()
            builder = trt.Builder(logger)
            network = builder.create_network(0)
            parser = trt.OnnxParser(network, logger)
            if not parser.parse(onnx_bytes):
                raise RuntimeError(f"TensorRT cannot parse {onnx_path}: {parser.get_error(0)}")
            config = builder.create_builder_config()
            if fp16 and builder.platform_has_fast_fp16:
                config.set_flag(trt.BuilderFlag.FP16)
            profile = builder.create_optimization_profile()
            for n, s in shapes.items():
                profile.set_shape(n, s, s, s)
            config.add_optimization_profile(profile)
            plan = builder.build_serialized_network(network, config)
            if plan is None:
                raise RuntimeError(f"TensorRT could not build an engine from {onnx_path}")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(bytes(plan))
            path.with_suffix(".json").write_text(json.dumps({"onnx_sha256": onnx_sha, "gpu": gpu, "tensorrt": trt.__version__, "fp16": fp16,
                                                             "shapes": {k: list(v) for k, v in shapes.items()}}, indent=1))
            engine = runtime.deserialize_cuda_engine(plan)
            _note(notes, f"built TensorRT engine {spec.name} {shapes} ({'FP16' if fp16 else 'FP32'}) in {time.perf_counter() - t0:.1f} s; cached at {path}",
                  logging.INFO)
        ctx = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        out = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        contexts[key] = (ctx, out)
        return contexts[key]

    def run(xs):
        n = None
        if spec.points_axis:
            n = xs[0].shape[1]
            xs = _pad_points(xs, max(256, 1 << (n - 1).bit_length()))
        xs = [x.to("cuda").contiguous() for x in xs]
        shapes = {name: tuple(x.shape) for name, x in zip(spec.inputs, xs)}
        ctx, out = engine_for(shapes)
        for name, x in zip(spec.inputs, xs):
            ctx.set_input_shape(name, tuple(x.shape))
            ctx.set_tensor_address(name, x.data_ptr())
        y = torch.empty(tuple(ctx.get_tensor_shape(out)), dtype=torch.float32, device="cuda")
        ctx.set_tensor_address(out, y.data_ptr())
        stream = torch.cuda.current_stream()
        ctx.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        return y if n is None else y[:, :n]

    return run


def load(model_path, network: str | None = None, backend: str = "auto", device: str = "auto", half: bool = False) -> Engine:
    """Load one network of a model file on a back-end (module docstring).

    Parameters
    ----------
    model_path : str or Path
        ``scr.pt``, ``ppcl.pt`` or ``ppcflow.pt`` (any name; recognised by content).
    network : str, optional
        Network name (:func:`networks_of`); may be omitted for single-network files.
    backend : str
        ``auto``, ``tensorrt``, ``onnxruntime`` or ``pytorch``.
    device : str
        ``auto``, ``cpu`` or ``cuda``.
    half : bool
        FP16 (PyTorch on CUDA, TensorRT); ignored on CPU.

    Raises
    ------
    ModelLoadError
        The model file cannot be read, or has no such network.
    ConfigError
        Unknown back-end or device name.
    """
    order = candidates(backend, device)
    specs = networks_of(model_path)
    if network is None:
        if len(specs) != 1:
            raise ModelLoadError(f"{model_path} holds the networks {', '.join(specs)}: name one")
        network = next(iter(specs))
    if network not in specs:
        raise ModelLoadError(f"{model_path} has no network {network!r} (it has {', '.join(specs)})")
    spec = specs[network]
    notes: list = []
    wanted = order[0]
    for be, dev in order:
        try:
            if be == "pytorch":
                if dev == "cuda" and not torch.cuda.is_available():
                    raise RuntimeError("PyTorch sees no CUDA device")
                run = _torch_runner(spec, dev, half)
            elif be == "onnxruntime":
                if not _importable("onnxruntime"):
                    raise RuntimeError("the Python package onnxruntime is not installed")
                run = _ort_runner(current_onnx(model_path, spec, len(specs), notes), spec, dev)
            else:
                if not _importable("tensorrt"):
                    raise RuntimeError("TensorRT is not installed")
                run = _tensorrt_runner(current_onnx(model_path, spec, len(specs), notes), spec, bool(half), notes)
        except ModelLoadError:
            raise
        except Exception as exc:
            msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            _note(notes, f"{Path(model_path).name}:{network}: back-end {be} on {dev} unavailable ({msg}); falling back")
            continue
        level = logging.INFO if (be, dev) == wanted else logging.WARNING
        _note(notes, f"{Path(model_path).name}:{network}: back-end {be} on {dev}" + ("" if (be, dev) == wanted else f" (asked for {wanted[0]})"), level)
        return Engine(spec, be, dev, run, notes)
    raise ModelLoadError(f"no back-end can run {model_path}:{network}: " + "; ".join(notes))  # pytorch on CPU always loads
