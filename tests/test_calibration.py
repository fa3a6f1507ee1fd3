"""Tests for onnxcomp.calibrate: data sources, validation against the model, activation capture."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from onnxcomp import capture as capture_module
from onnxcomp.calibration import Calibration, ImageOptions, load_calibration
from onnxcomp.capture import CaptureTooLargeError, capture, iter_capture, run_model, with_outputs
from onnxcomp.passbase import ConfigError, InputError
from onnxcomp.synthetic import synthetic_calibration

IR_VERSION = 8
OPSET = 17

# ---------------------------------------------------------------------------- model builders


def _model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
    initializers: Sequence[onnx.TensorProto] = (),
    check: bool = True,
) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "test", list(inputs), list(outputs), list(initializers))
    model = helper.make_model(
        graph, ir_version=IR_VERSION, opset_imports=[helper.make_opsetid("", OPSET)]
    )
    if check:
        onnx.checker.check_model(model)
    return model


def _input(name: str, shape: Sequence[int | str | None] | None, elem: int = TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def _unary(
    shape: Sequence[int | str | None] | None, op: str = "Relu", elem: int = TensorProto.FLOAT
) -> onnx.ModelProto:
    """x -> op -> y (the checker needs shapes, so a shapeless input skips it)."""
    return _model([helper.make_node(op, ["x"], ["y"])], [_input("x", shape, elem)],
                  [_input("y", shape, elem)], check=shape is not None)


def _two_inputs() -> onnx.ModelProto:
    """a + b -> y, both (N, 4)."""
    return _model(
        [helper.make_node("Add", ["a", "b"], ["y"])],
        [_input("a", ["N", 4]), _input("b", ["N", 4])],
        [_input("y", ["N", 4])],
    )


def _conv_weights() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    weight = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(4).astype(np.float32)
    return weight, bias


def _conv_relu() -> onnx.ModelProto:
    """x (N, 3, 8, 8) -> Conv 3x3 (4 out, no pad) -> c -> Relu -> y."""
    weight, bias = _conv_weights()
    return _model(
        [
            helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv"),
            helper.make_node("Relu", ["c"], ["y"], name="relu"),
        ],
        [_input("x", ["N", 3, 8, 8])],
        [_input("y", ["N", 4, 6, 6])],
        [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "B")],
    )


def _conv_reference(x: np.ndarray) -> np.ndarray:
    """NumPy valid 3x3 convolution (cross-correlation, stride 1) with bias."""
    weight, bias = _conv_weights()
    n, _, h, w = x.shape
    out = np.zeros((n, 4, h - 2, w - 2), np.float64)
    for i in range(3):
        for j in range(3):
            patch = x[:, :, i:i + h - 2, j:j + w - 2].astype(np.float64)
            out += np.einsum("nchw,oc->nohw", patch, weight[:, :, i, j].astype(np.float64))
    return out + bias[None, :, None, None]


def _save_png(path: Path, pixels: np.ndarray) -> None:
    Image.fromarray(pixels.astype(np.uint8)).save(path)


# ---------------------------------------------------------------------------- npz / npy


def test_npz_round_trip_splits_and_casts(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = rng.standard_normal((10, 3, 8, 8))  # float64: cast to the model's float32
    path = tmp_path / "calib.npz"
    np.savez(path, x=data)

    calib = load_calibration(path, _conv_relu(), batch_size=4)

    assert not calib.synthetic
    assert str(path) in calib.source
    assert calib.num_samples == 10
    assert calib.batch_sizes() == [4, 4, 2]
    assert calib.input_names == ["x"]
    assert calib.input_shapes() == {"x": (4, 3, 8, 8)}
    assert all(b["x"].dtype == np.float32 for b in calib.iter_batches())
    np.testing.assert_array_equal(calib.all_inputs()["x"], data.astype(np.float32))


def test_npz_two_inputs_and_limit(tmp_path: Path) -> None:
    a = np.arange(24, dtype=np.float32).reshape(6, 4)
    path = tmp_path / "two.npz"
    np.savez(path, a=a, b=-a)

    calib = load_calibration(path, _two_inputs(), batch_size=2, limit=5)

    assert calib.batch_sizes() == [2, 2, 1]
    inputs = calib.all_inputs()
    np.testing.assert_array_equal(inputs["a"], a[:5])
    np.testing.assert_array_equal(inputs["b"], -a[:5])
    (out,) = run_model(_two_inputs(), calib)
    np.testing.assert_array_equal(out, np.zeros((5, 4), np.float32))


def test_npz_missing_key_names_it(tmp_path: Path) -> None:
    path = tmp_path / "c.npz"
    np.savez(path, a=np.zeros((2, 4), np.float32))
    with pytest.raises(InputError, match=r"missing input\(s\) 'b'") as info:
        load_calibration(path, _two_inputs())
    assert str(path) in str(info.value)


def test_npz_extra_key_names_it(tmp_path: Path) -> None:
    path = tmp_path / "c.npz"
    zeros = np.zeros((2, 4), np.float32)
    np.savez(path, a=zeros, b=zeros, c=zeros)
    with pytest.raises(InputError, match=r"unexpected key\(s\) 'c'"):
        load_calibration(path, _two_inputs())


def test_npz_wrong_shape_message(tmp_path: Path) -> None:
    path = tmp_path / "c.npz"
    np.savez(path, x=np.zeros((8, 3, 32, 32), np.float32))
    with pytest.raises(InputError) as info:
        load_calibration(path, _conv_relu())
    assert str(info.value) == (
        "calibration input 'x' has shape (8, 3, 32, 32), model expects (N, 3, 8, 8)"
    )


def test_npz_wrong_rank_message(tmp_path: Path) -> None:
    path = tmp_path / "c.npz"
    np.savez(path, x=np.zeros((8, 3, 8), np.float32))
    expected = r"'x' has shape \(8, 3, 8\), model expects \(N, 3, 8, 8\)"
    with pytest.raises(InputError, match=expected):
        load_calibration(path, _conv_relu())


def test_npz_different_sample_counts(tmp_path: Path) -> None:
    path = tmp_path / "c.npz"
    np.savez(path, a=np.zeros((3, 4), np.float32), b=np.zeros((2, 4), np.float32))
    with pytest.raises(InputError, match="different sample counts: 'a' 3, 'b' 2"):
        load_calibration(path, _two_inputs())


def test_npz_empty_array(tmp_path: Path) -> None:
    path = tmp_path / "c.npz"
    np.savez(path, x=np.zeros((0, 3, 8, 8), np.float32))
    with pytest.raises(InputError, match="no samples"):
        load_calibration(path, _conv_relu())


def test_float_data_to_int_input_rejected(tmp_path: Path) -> None:
    model = _model(
        [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)],
        [_input("x", ["N", 4], TensorProto.INT64)],
        [_input("y", ["N", 4])],
    )
    path = tmp_path / "f.npz"
    np.savez(path, x=np.zeros((2, 4), np.float32))
    with pytest.raises(InputError, match="float data cannot feed an integer input"):
        load_calibration(path, model)

    np.savez(path, x=np.arange(8, dtype=np.int32).reshape(2, 4))
    calib = load_calibration(path, model)
    assert calib.batches[0]["x"].dtype == np.int64
    np.testing.assert_array_equal(run_model(model, calib)[0], np.arange(8).reshape(2, 4))


def test_int_data_out_of_range_rejected(tmp_path: Path) -> None:
    model = _unary(["N", 2], op="Identity", elem=TensorProto.UINT8)
    path = tmp_path / "u.npy"
    np.save(path, np.array([[0, 300], [1, 2]], np.int64))
    with pytest.raises(InputError, match=r"outside the range of uint8"):
        load_calibration(path, model)


def test_npy_single_input(tmp_path: Path) -> None:
    data = np.random.default_rng(1).standard_normal((5, 3, 8, 8)).astype(np.float32)
    path = tmp_path / "x.npy"
    np.save(path, data)

    calib = load_calibration(path, _conv_relu(), batch_size=2, limit=3)

    assert calib.batch_sizes() == [2, 1]
    assert type(calib.batches[0]["x"]) is np.ndarray  # copied out of the memory map
    np.testing.assert_array_equal(calib.all_inputs()["x"], data[:3])


def test_npy_for_two_input_model_rejected(tmp_path: Path) -> None:
    path = tmp_path / "x.npy"
    np.save(path, np.zeros((2, 4), np.float32))
    with pytest.raises(InputError, match=r"2 inputs \('a', 'b'\); use an .npz"):
        load_calibration(path, _two_inputs())


def test_bad_paths_name_the_file(tmp_path: Path) -> None:
    model = _conv_relu()
    missing = tmp_path / "nope.npz"
    with pytest.raises(InputError, match="no such calibration file") as info:
        load_calibration(missing, model)
    assert str(missing) in str(info.value)

    other = tmp_path / "data.txt"
    other.write_text("1 2 3")
    with pytest.raises(InputError, match="unsupported calibration file type '.txt'"):
        load_calibration(other, model)

    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 definitely not a zip archive")
    with pytest.raises(InputError, match="not a readable .npz file") as info:
        load_calibration(corrupt, model)
    assert str(corrupt) in str(info.value)
    assert "\n" not in str(info.value)

    corrupt_npy = tmp_path / "corrupt.npy"
    corrupt_npy.write_bytes(b"garbage")
    with pytest.raises(InputError, match="not a readable .npy file"):
        load_calibration(corrupt_npy, model)


def test_bad_counts_are_config_errors(tmp_path: Path) -> None:
    path = tmp_path / "x.npy"
    np.save(path, np.zeros((2, 3, 8, 8), np.float32))
    with pytest.raises(ConfigError):
        load_calibration(path, _conv_relu(), batch_size=0)
    with pytest.raises(ConfigError):
        load_calibration(path, _conv_relu(), limit=0)


def test_fixed_batch_dim_one_gives_batches_of_one(tmp_path: Path) -> None:
    model = _unary([1, 3, 4, 4])
    data = np.random.default_rng(2).standard_normal((3, 3, 4, 4)).astype(np.float32)
    path = tmp_path / "x.npy"
    np.save(path, data)

    calib = load_calibration(path, model, batch_size=8)

    assert calib.batch_sizes() == [1, 1, 1]
    (out,) = run_model(model, calib)
    np.testing.assert_array_equal(out, np.maximum(data, 0))


def test_fixed_batch_dim_drops_remainder(tmp_path: Path) -> None:
    model = _unary([2, 3])
    path = tmp_path / "x.npy"
    np.save(path, np.zeros((5, 3), np.float32))
    assert load_calibration(path, model).batch_sizes() == [2, 2]

    np.save(path, np.zeros((1, 3), np.float32))
    with pytest.raises(InputError, match="batches of exactly 2"):
        load_calibration(path, model)


# ---------------------------------------------------------------------------- images


PIXEL = (10, 100, 200)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """b.png: solid PIXEL at 5x7 (gets resized); a.png: a 4x4 gradient; plus a non-image."""
    folder = tmp_path / "images"
    folder.mkdir()
    gradient = np.zeros((4, 4, 3), np.uint8)
    gradient[..., 0] = np.arange(16).reshape(4, 4) * 10
    gradient[..., 1] = 50
    gradient[..., 2] = 255
    _save_png(folder / "a.png", gradient)
    _save_png(folder / "b.png", np.broadcast_to(np.array(PIXEL, np.uint8), (5, 7, 3)))
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_images_nchw_scale_mean_std(image_folder: Path) -> None:
    mean, std, scale = (0.5, 0.25, 0.125), (0.5, 2.0, 4.0), 1 / 255
    options = ImageOptions(mean=mean, std=std, scale=scale)

    calib = load_calibration(image_folder, _unary(["N", 3, 4, 4]), image_options=options)

    x = calib.all_inputs()["x"]
    assert x.shape == (2, 3, 4, 4) and x.dtype == np.float32
    expected = (np.array(PIXEL) * scale - np.array(mean)) / np.array(std)
    # b.png (second by name) is solid, so the bilinear resize from 5x7 keeps it solid.
    np.testing.assert_allclose(x[1], np.broadcast_to(expected[:, None, None], (3, 4, 4)),
                               rtol=1e-6)
    # a.png is already 4x4: pixels pass through the resize unchanged.
    red = np.arange(16).reshape(4, 4) * 10
    np.testing.assert_allclose(x[0, 0], (red * scale - mean[0]) / std[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(x[0, 2], np.full((4, 4), (255 * scale - mean[2]) / std[2]),
                               rtol=1e-6)


def test_images_nhwc_and_bgr(image_folder: Path) -> None:
    model = _unary(["N", 4, 4, 3])
    nhwc = load_calibration(
        image_folder, model, image_options=ImageOptions(layout="nhwc", scale=1.0)
    ).all_inputs()["x"]
    bgr = load_calibration(
        image_folder, model, image_options=ImageOptions(layout="nhwc", scale=1.0, bgr=True)
    ).all_inputs()["x"]

    assert nhwc.shape == (2, 4, 4, 3)
    np.testing.assert_array_equal(nhwc[1, 2, 3], np.array(PIXEL, np.float32))
    np.testing.assert_array_equal(bgr[1, 2, 3], np.array(PIXEL[::-1], np.float32))
    np.testing.assert_array_equal(bgr, nhwc[..., ::-1])


def test_images_explicit_size_and_limit(image_folder: Path) -> None:
    model = _unary(["N", 3, "h", "w"])
    options = ImageOptions(size=(6, 9), scale=1.0)
    calib = load_calibration(image_folder, model, image_options=options, limit=1)
    assert calib.input_shapes() == {"x": (1, 3, 6, 9)}

    with pytest.raises(InputError, match="give an image size"):
        load_calibration(image_folder, model)


def test_images_grayscale_is_automatic(image_folder: Path) -> None:
    calib = load_calibration(image_folder, _unary(["N", 1, 4, 4]),
                             image_options=ImageOptions(scale=1.0))
    x = calib.all_inputs()["x"]
    assert x.shape == (2, 1, 4, 4)
    gray = Image.new("RGB", (1, 1), PIXEL).convert("L").getpixel((0, 0))
    np.testing.assert_array_equal(x[1], np.full((1, 4, 4), gray, np.float32))


def test_images_wrong_channels_hint(image_folder: Path) -> None:
    with pytest.raises(InputError, match="check the image options"):
        load_calibration(image_folder, _unary(["N", 3, 4, 4]),
                         image_options=ImageOptions(grayscale=True))


def test_images_raw_pixels_for_uint8_input(image_folder: Path) -> None:
    model = _unary(["N", 4, 4, 3], op="Identity", elem=TensorProto.UINT8)
    raw = ImageOptions(layout="nhwc", scale=1.0)
    x = load_calibration(image_folder, model, image_options=raw).all_inputs()["x"]
    assert x.dtype == np.uint8
    np.testing.assert_array_equal(x[1, 0, 0], PIXEL)

    with pytest.raises(InputError, match="scale=1, mean=0, std=1"):
        load_calibration(image_folder, model, image_options=ImageOptions(layout="nhwc"))


def test_empty_image_folder(tmp_path: Path) -> None:
    (tmp_path / "readme.md").write_text("nothing here")
    with pytest.raises(InputError, match="no images") as info:
        load_calibration(tmp_path, _conv_relu())
    assert str(tmp_path) in str(info.value)


def test_corrupt_image_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(InputError, match="not a readable image") as info:
        load_calibration(tmp_path, _unary(["N", 3, 4, 4]))
    assert str(bad) in str(info.value)


def test_images_need_a_single_4d_input(image_folder: Path) -> None:
    with pytest.raises(InputError, match="single-input model"):
        load_calibration(image_folder, _two_inputs())
    with pytest.raises(InputError, match="4-D image input"):
        load_calibration(image_folder, _unary(["N", 3, 4]))


def test_mean_length_must_fit_channels(image_folder: Path) -> None:
    with pytest.raises(ConfigError, match="mean has 2 values"):
        load_calibration(image_folder, _unary(["N", 3, 4, 4]),
                         image_options=ImageOptions(mean=(0.1, 0.2)))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"size": (0, 4)},
        {"size": (4,)},
        {"std": (1.0, 0.0, 1.0)},
        {"mean": ()},
        {"mean": (float("nan"),)},
        {"scale": 0.0},
        {"layout": "chw"},
        {"bgr": "yes"},
        {"grayscale": 1},
    ],
)
def test_image_options_validation(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        ImageOptions(**kwargs)  # type: ignore[arg-type]


def test_image_options_normalizes() -> None:
    options = ImageOptions(size=[3, 5], mean=[1, 2, 3], std=2)  # type: ignore[arg-type]
    assert options.size == (3, 5)
    assert options.mean == (1.0, 2.0, 3.0)
    assert options.std == (2.0,)


# ---------------------------------------------------------------------------- synthetic


def test_synthetic_symbolic_batch() -> None:
    model = _conv_relu()
    calib = synthetic_calibration(model, num_samples=10, batch_size=4, seed=3)

    assert calib.synthetic
    assert calib.batch_sizes() == [4, 4, 2]
    x = calib.all_inputs()["x"]
    assert x.shape == (10, 3, 8, 8) and x.dtype == np.float32
    assert abs(float(x.mean())) < 0.2 and 0.8 < float(x.std()) < 1.2
    again = synthetic_calibration(model, num_samples=10, batch_size=4, seed=3).all_inputs()["x"]
    np.testing.assert_array_equal(x, again)
    other = synthetic_calibration(model, num_samples=10, batch_size=4, seed=4).all_inputs()["x"]
    assert not np.array_equal(x, other)


def test_synthetic_dynamic_spatial_dim() -> None:
    model = _unary(["N", 3, "h", "w"])
    with pytest.raises(InputError, match=r"input 'x' has dynamic dim 'h' \(axis 2\)"):
        synthetic_calibration(model)

    calib = synthetic_calibration(model, num_samples=2, dims={"h": 5, "w": 7})
    assert calib.input_shapes() == {"x": (2, 3, 5, 7)}


def test_synthetic_unnamed_dim_and_scalar() -> None:
    model = _unary(["N", None])
    with pytest.raises(InputError, match="'x:1'"):
        synthetic_calibration(model)
    assert synthetic_calibration(model, 2, dims={"x:1": 3}).input_shapes() == {"x": (2, 3)}

    with pytest.raises(InputError, match="scalar"):
        synthetic_calibration(_unary([]))
    with pytest.raises(InputError, match="no shape"):
        synthetic_calibration(_unary(None))


def test_synthetic_fixed_batch_and_int_inputs() -> None:
    model = _model(
        [helper.make_node("Cast", ["i"], ["ci"], to=TensorProto.FLOAT),
         helper.make_node("Add", ["x", "ci"], ["y"])],
        [_input("x", [1, 4]), _input("i", [1, 4], TensorProto.INT64)],
        [_input("y", [1, 4])],
    )
    calib = synthetic_calibration(model, num_samples=3, batch_size=8)
    assert calib.batch_sizes() == [1, 1, 1]
    inputs = calib.all_inputs()
    assert inputs["i"].dtype == np.int64 and not inputs["i"].any()
    (out,) = run_model(model, calib)
    np.testing.assert_array_equal(out, inputs["x"])


def test_synthetic_config_errors() -> None:
    with pytest.raises(ConfigError):
        synthetic_calibration(_conv_relu(), num_samples=0)
    with pytest.raises(ConfigError):
        synthetic_calibration(_unary(["N", "h"]), dims={"h": -1})


@settings(max_examples=25, deadline=None)
@given(num_samples=st.integers(1, 20), batch_size=st.integers(1, 7))
def test_synthetic_split_property(num_samples: int, batch_size: int) -> None:
    calib = synthetic_calibration(_unary(["N", 2]), num_samples, batch_size)
    sizes = calib.batch_sizes()
    assert sum(sizes) == num_samples
    assert all(s == batch_size for s in sizes[:-1]) and 0 < sizes[-1] <= batch_size


def test_calibration_rejects_inconsistent_batches() -> None:
    with pytest.raises(InputError):
        Calibration([], synthetic=True, source="empty")
    with pytest.raises(InputError, match="batch 1"):
        Calibration([{"x": np.zeros(1)}, {"y": np.zeros(1)}], synthetic=True, source="t")


# ---------------------------------------------------------------------------- capture


def test_capture_internal_tensor_matches_numpy() -> None:
    model = _conv_relu()
    calib = synthetic_calibration(model, num_samples=5, batch_size=2, seed=11)

    captured = capture(model, ["c"], calib)

    pre_relu = captured["c"]
    assert pre_relu.shape == (5, 4, 6, 6)
    assert (pre_relu < 0).any()
    np.testing.assert_allclose(pre_relu, _conv_reference(calib.all_inputs()["x"]),
                               rtol=1e-4, atol=1e-5)
    (y,) = run_model(model, calib)
    np.testing.assert_array_equal(y, np.maximum(pre_relu, 0))


def test_capture_does_not_mutate_and_dedupes() -> None:
    model = _conv_relu()
    before = model.SerializeToString()
    calib = synthetic_calibration(model, num_samples=3, batch_size=2)

    captured = capture(model, ["x", "c", "y", "c"], calib)

    assert model.SerializeToString() == before
    assert list(captured) == ["x", "c", "y"]
    np.testing.assert_array_equal(captured["x"], calib.all_inputs()["x"])
    np.testing.assert_array_equal(captured["y"], np.maximum(captured["c"], 0))


def test_with_outputs_types_from_inference() -> None:
    model = _conv_relu()
    extended = with_outputs(model, ["c", "y"])
    outputs = {o.name: o for o in extended.graph.output}
    assert list(outputs) == ["y", "c"]
    dims = [d.dim_value or d.dim_param for d in outputs["c"].type.tensor_type.shape.dim]
    assert outputs["c"].type.tensor_type.elem_type == TensorProto.FLOAT
    assert dims == ["N", 4, 6, 6]
    assert len(model.graph.output) == 1


def test_untyped_capture_output_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(model: onnx.ModelProto) -> onnx.ModelProto:
        raise onnx.shape_inference.InferenceError("inference unavailable")

    monkeypatch.setattr(capture_module.model_io, "infer_shapes", fail)
    model = _conv_relu()
    extended = with_outputs(model, ["c"])
    assert not extended.graph.output[-1].type.HasField("tensor_type")

    calib = synthetic_calibration(model, num_samples=2)
    captured = capture(model, ["c"], calib)
    np.testing.assert_allclose(captured["c"], _conv_reference(calib.all_inputs()["x"]),
                               rtol=1e-4, atol=1e-5)


def test_iter_capture_streams_same_values() -> None:
    model = _conv_relu()
    calib = synthetic_calibration(model, num_samples=7, batch_size=3, seed=5)
    whole = capture(model, ["c", "y"], calib)

    pieces = list(iter_capture(model, ["c", "y"], calib))

    assert [p["c"].shape[0] for p in pieces] == [3, 3, 1]
    for name in ("c", "y"):
        np.testing.assert_array_equal(np.concatenate([p[name] for p in pieces]), whole[name])
    # Streaming statistics: the Gram matrix of the channels accumulated batch by batch.
    gram = sum(p["c"].transpose(1, 0, 2, 3).reshape(4, -1) @
               p["c"].transpose(1, 0, 2, 3).reshape(4, -1).T for p in pieces)
    flat = whole["c"].transpose(1, 0, 2, 3).reshape(4, -1)
    np.testing.assert_allclose(gram, flat @ flat.T, rtol=1e-5)


class _CountingCalibration(Calibration):
    """A calibration set that counts how many batches were handed out."""

    served = 0

    def iter_batches(self) -> Iterator[dict[str, np.ndarray]]:
        for batch in self.batches:
            self.served += 1
            yield batch


def test_capture_max_bytes_checked_on_first_batch() -> None:
    model = _conv_relu()
    base = synthetic_calibration(model, num_samples=8, batch_size=2)
    calib = _CountingCalibration(base.batches, synthetic=True, source="counting")
    per_batch = 2 * 4 * 6 * 6 * 4  # tensor 'c': 2 samples x 4 x 6 x 6 float32

    with pytest.raises(CaptureTooLargeError, match="iter_capture") as info:
        capture(model, ["c"], calib, max_bytes=2 * per_batch)

    assert isinstance(info.value, InputError)
    assert f"({4 * per_batch} bytes)" in str(info.value)
    assert calib.served == 1
    assert capture(model, ["c"], calib, max_bytes=4 * per_batch)["c"].shape == (8, 4, 6, 6)


def test_unknown_tensor_name() -> None:
    model = _conv_relu()
    calib = synthetic_calibration(model, num_samples=2)
    with pytest.raises(InputError, match="'nope'"):
        with_outputs(model, ["c", "nope"])
    with pytest.raises(InputError, match="'nope'"):
        iter_capture(model, ["nope"], calib)  # raised eagerly, before iterating
    with pytest.raises(InputError, match="'nope'"):
        capture(model, ["nope"], calib)
    with pytest.raises(InputError, match="sequence of names"):
        capture(model, "c", calib)


def test_calibration_missing_model_input() -> None:
    calib = synthetic_calibration(_conv_relu(), num_samples=2)
    with pytest.raises(InputError, match="no values for model input"):
        run_model(_two_inputs(), calib)


def test_an_empty_batch_is_a_clear_error():
    from onnxcomp.calibration import Calibration
    from onnxcomp.errors import InputError

    full = {"x": np.zeros([2, 3], np.float32)}
    with pytest.raises(InputError, match="batch 1 of 'mine' is empty"):
        Calibration([full, {"x": np.zeros([0, 3], np.float32)}], False, "mine")


def test_raw_uint8_pixels_for_a_float_input_get_a_warning(tmp_path, caplog):
    import logging

    from builders import conv_model as _conv

    from onnxcomp.calibration import load_calibration

    model = _conv(np.ones([4, 3, 3, 3], np.float32), size=8, batch="N")
    np.savez(tmp_path / "raw.npz", x=np.full([4, 3, 8, 8], 200, np.uint8))
    with caplog.at_level(logging.WARNING, logger="onnxcomp.calibration"):
        calib = load_calibration(tmp_path / "raw.npz", model)
    assert calib.batches[0]["x"].dtype == np.float32
    assert "raw pixels" in caplog.text and "[200, 200]" in caplog.text
    caplog.clear()
    np.savez(tmp_path / "norm.npz", x=np.full([4, 3, 8, 8], 0.5, np.float32))
    with caplog.at_level(logging.WARNING, logger="onnxcomp.calibration"):
        load_calibration(tmp_path / "norm.npz", model)
    assert "raw pixels" not in caplog.text
