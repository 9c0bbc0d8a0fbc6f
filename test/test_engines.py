"""Back-end and device selection, and model-file checks (corrupt files are clear errors)."""

import pytest
import torch

from reg2d3d_ros.engines import (available_backends, check_model_file, check_models_dir, cuda_available,
                                 resolve_backend, resolve_device)
from reg2d3d_ros.errors import ConfigError, ModelLoadError


def tiny_onnx(path):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_valid_model_files_pass(tmp_path):
    tiny_onnx(tmp_path / "net.onnx")
    torch.save({"w": torch.ones(3)}, tmp_path / "net.pt")
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "lin.pth")
    (tmp_path / "notes.txt").write_text("not a model")
    got = check_models_dir(tmp_path)
    assert [g["kind"] for g in got] == ["pth", "onnx", "pt"]
    assert all(g["bytes"] > 0 for g in got)
    assert check_models_dir("") == []


@pytest.mark.parametrize("name,content,expected", [
    ("scr.onnx", b"\x08\x07garbage-not-protobuf" * 50, "corrupt or incompatible"),
    ("scr.pt", b"PK\x03\x04 truncated zip", "corrupt or incompatible"),
    ("scr.pth", b"nonsense", "corrupt or incompatible"),
    ("scr.onnx", b"", "is empty"),
    ("scr.bin", b"1234", "unknown kind"),
])
def test_corrupt_model_files_are_clear_errors(tmp_path, name, content, expected):
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(ModelLoadError, match=expected) as info:
        check_model_file(p)
    assert str(p) in str(info.value)


def test_pickled_object_is_refused(tmp_path):
    p = tmp_path / "model.pt"
    torch.save([1, 2, 3], p)  # not a state dictionary
    with pytest.raises(ModelLoadError, match="expected a state dictionary"):
        check_model_file(p)


def test_missing_models_and_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        check_model_file(tmp_path / "nope.onnx")
    with pytest.raises(ModelLoadError, match="models folder"):
        check_models_dir(tmp_path / "no_folder")


def test_backend_and_device_resolution(caplog):
    avail = available_backends()
    assert avail[-1] == "pytorch" and "onnxruntime" in avail  # onnxruntime is a project dependency
    assert resolve_backend("pytorch") == "pytorch"
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if cuda_available() else "cpu")
    with pytest.raises(ConfigError, match="backend must be one of"):
        resolve_backend("openvino")
    with pytest.raises(ConfigError, match="device must be one of"):
        resolve_device("tpu")
    if "tensorrt" not in avail:  # an unavailable back-end is a warning and a fall-back, never a crash
        with caplog.at_level("WARNING", logger="reg2d3d_ros.engines"):
            assert resolve_backend("tensorrt") == ("pytorch" if cuda_available() else "onnxruntime")
        assert "not available here" in caplog.text
    else:
        assert resolve_backend("auto") == "tensorrt"
    if not cuda_available():
        assert resolve_backend("auto", "cpu") == "onnxruntime"
        with pytest.raises(ConfigError, match="no CUDA device"):
            resolve_device("cuda")


def test_auto_order_is_tensorrt_then_cuda_torch_then_cpu(monkeypatch):
    from reg2d3d_ros.engines import candidates

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert candidates("auto", "auto") == [("onnxruntime", "cpu"), ("pytorch", "cpu")]
    assert candidates("pytorch", "auto") == [("pytorch", "cpu"), ("onnxruntime", "cpu")]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert candidates("auto", "auto") == [("tensorrt", "cuda"), ("pytorch", "cuda"), ("onnxruntime", "cpu"), ("pytorch", "cpu")]
    assert candidates("auto", "cpu") == [("onnxruntime", "cpu"), ("pytorch", "cpu")]
    assert candidates("onnxruntime", "cuda")[0] == ("onnxruntime", "cuda")


REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def committed_networks():
    from reg2d3d_ros import ppcflow, ppcl, scr  # noqa: F401  (importing a method registers the format of its model files)
    from reg2d3d_ros.engines import model_files, networks_of

    return [(f, n) for f in model_files(REPO / "models") for n in networks_of(f)]


def test_each_method_registers_its_model_format(tmp_path):
    """``engines`` knows no method: importing a method registers the format of its model files; a
    ``.pt`` of a format nobody registered is not a model file of this project."""
    from reg2d3d_ros import ppcflow, ppcl, scr
    from reg2d3d_ros.engines import networks_of, registered_formats

    assert {scr.model.FORMAT, ppcl.FORMAT, ppcflow.FORMAT} <= set(registered_formats())
    assert len(committed_networks()) >= 4  # scr, ppcl levels, flow (+ attention): none was skipped as unknown
    torch.save({"format": "someone_else", "version": 1}, tmp_path / "other.pt")
    with pytest.raises(ModelLoadError, match="not a model file of reg2d3d_ros"):
        networks_of(tmp_path / "other.pt")


@pytest.mark.parametrize("model_path,name", committed_networks(), ids=lambda x: getattr(x, "name", x))
def test_committed_onnx_graphs_are_current_and_match_pytorch(model_path, name):
    """Every committed network: its ONNX graph beside the model file was exported from that very file,
    and ONNX Runtime agrees with PyTorch on random inputs (two sizes where sizes vary)."""
    from reg2d3d_ros.engines import load
    from reg2d3d_ros.export_models import check_inputs

    ort = load(model_path, name, "onnxruntime", "cpu")
    assert ort.backend == "onnxruntime"
    assert not any("exported" in n for n in ort.notes), ort.notes  # run python -m reg2d3d_ros.export_models and commit
    ref = load(model_path, name, "pytorch", "cpu")
    for xs in check_inputs(ort.spec):
        a, b = ort(*xs), ref(*xs)
        assert a.shape == b.shape and a.dtype == torch.float32
        assert float((a - b).abs().max()) <= 1e-4 * max(1.0, float(b.abs().max()))


def test_numpy_in_numpy_out_and_torch_in_torch_out():
    import numpy as np

    from reg2d3d_ros.engines import load

    e = load(REPO / "models" / "ppcl" / "ppcl.pt", "level_0.25", "pytorch", "cpu", half=True)  # half is a CUDA option: ignored on CPU
    f = np.random.default_rng(0).standard_normal((1, 40, 13)).astype(np.float32)
    m = np.ones((1, 40), bool)
    y = e(f, m)
    assert isinstance(y, np.ndarray) and y.shape == (1, 40) and y.dtype == np.float32
    yt = e(torch.from_numpy(f), torch.from_numpy(m))
    assert torch.is_tensor(yt) and torch.allclose(yt, torch.from_numpy(y))
    m[0, 20:] = False  # masked points get weight 0 and do not change the others... through the global max-pool they may
    assert float(np.abs(e(f, m)[0, 20:]).max()) == 0.0
    with pytest.raises(ValueError, match="takes 2 inputs"):
        e(f)


def test_broken_backend_falls_back_with_a_warning(monkeypatch, caplog, tmp_path):
    from reg2d3d_ros.engines import load, runtime

    def broken(*args, **kwargs):
        raise RuntimeError("simulated: the CUDA provider library is missing")

    monkeypatch.setattr(runtime, "_ort_runner", broken)
    with caplog.at_level("WARNING", logger="reg2d3d_ros.engines"):
        e = load(REPO / "models" / "example_T8" / "scr.pt", "scr", "onnxruntime", "cpu")
    assert e.backend == "pytorch" and e.device == "cpu"
    assert "onnxruntime on cpu unavailable (simulated" in caplog.text and "asked for onnxruntime" in caplog.text
    e2 = load(REPO / "models" / "example_T8" / "scr.pt", "scr", "tensorrt", "auto")  # TensorRT not here (or no GPU): falls back
    assert e2.backend in ("tensorrt", "pytorch", "onnxruntime")
    if not available_backends()[0] == "tensorrt":
        assert e2.backend != "tensorrt" and any("falling back" in n for n in e2.notes)
    # the user's file is not a back-end problem: a corrupt model is a clear error, no fall-back
    bad = tmp_path / "scr.pt"
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ModelLoadError, match="cannot be read"):
        load(bad, "scr")
    with pytest.raises(ModelLoadError, match="has no network 'level_3'"):
        load(REPO / "models" / "ppcl" / "ppcl.pt", "level_3")
    with pytest.raises(ModelLoadError, match="name one"):
        load(REPO / "models" / "ppcl" / "ppcl.pt")


def test_missing_or_stale_onnx_is_exported_into_the_cache(monkeypatch, tmp_path):
    import shutil

    from reg2d3d_ros.engines import load

    monkeypatch.setenv("REG2D3D_ENGINE_CACHE", str(tmp_path / "cache"))
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(REPO / "models" / "ppcl" / "ppcl.pt", d / "ppcl.pt")
    e = load(d / "ppcl.pt", "level_0.5", "onnxruntime", "cpu")
    assert e.backend == "onnxruntime" and any("is missing: exported" in n for n in e.notes)
    assert list((tmp_path / "cache" / "onnx").rglob("level_0.5.onnx"))
    again = load(d / "ppcl.pt", "level_0.5", "onnxruntime", "cpu")
    assert not any("exported" in n for n in again.notes)  # reused from the cache
    # a graph beside the model that was exported from another file is not used
    shutil.copy(REPO / "models" / "ppcl" / "ppcl.level_0.25.onnx", d / "ppcl.level_0.5.onnx")
    shutil.rmtree(tmp_path / "cache")
    stale = load(d / "ppcl.pt", "level_0.5", "onnxruntime", "cpu")
    assert any("was exported from another model file or network" in n for n in stale.notes)
    ref = load(d / "ppcl.pt", "level_0.5", "pytorch", "cpu")
    f, m = torch.randn(1, 64, 13), torch.ones(1, 64, dtype=torch.bool)
    assert torch.allclose(stale(f, m), ref(f, m), atol=1e-5)


def test_tensorrt_cache_key_changes_with_every_component():
    from reg2d3d_ros.engines import trt_cache_key

    base = dict(onnx_sha256="a" * 64, gpu_name="NVIDIA H100", trt_version="10.3.0", fp16=True, shapes={"image": (1, 1, 128, 128)})
    k0 = trt_cache_key(**base)
    assert k0 == trt_cache_key(**dict(base))
    for change in (dict(onnx_sha256="b" * 64), dict(gpu_name="NVIDIA H200"), dict(trt_version="10.4.0"), dict(fp16=False),
                   dict(shapes={"image": (1, 1, 256, 256)})):
        assert trt_cache_key(**{**base, **change}) != k0, change


def test_tensorrt_engine_build_cache_and_agreement(tmp_path, monkeypatch):
    """Runs only where TensorRT and a CUDA GPU exist (reported as skipped elsewhere, never faked)."""
    pytest.importorskip("tensorrt")
    if not cuda_available():
        pytest.skip("TensorRT is importable but there is no CUDA GPU")
    from reg2d3d_ros.engines import load

    monkeypatch.setenv("REG2D3D_ENGINE_CACHE", str(tmp_path))
    path = REPO / "models" / "example_T8" / "scr.pt"
    e = load(path, "scr", "tensorrt", "cuda")
    assert e.backend == "tensorrt"
    x = torch.randn(1, 1, e.spec.inputs["image"][2], e.spec.inputs["image"][3], device="cuda")
    y = e(x)
    assert any("built TensorRT engine" in n for n in e.notes)
    ref = load(path, "scr", "pytorch", "cuda")(x)
    assert float((y - ref).abs().max()) <= 1e-3 * max(1.0, float(ref.abs().max()))
    e2 = load(path, "scr", "tensorrt", "cuda")
    e2(x)
    assert not any("built TensorRT engine" in n for n in e2.notes)  # read from the cache
    assert list(tmp_path.rglob("*.engine"))
