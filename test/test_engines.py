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


def test_backend_and_device_resolution():
    avail = available_backends()
    assert avail[-1] == "pytorch" and "onnxruntime" in avail  # onnxruntime is a project dependency
    assert resolve_backend("auto", "cpu") in ("onnxruntime", "pytorch")
    assert resolve_backend("pytorch") == "pytorch"
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if cuda_available() else "cpu")
    with pytest.raises(ConfigError, match="backend must be one of"):
        resolve_backend("openvino")
    with pytest.raises(ConfigError, match="device must be one of"):
        resolve_device("tpu")
    if "tensorrt" not in avail:
        with pytest.raises(ConfigError, match="not available here"):
            resolve_backend("tensorrt")
    else:
        assert resolve_backend("auto") == "tensorrt"
    if not cuda_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            resolve_device("cuda")
