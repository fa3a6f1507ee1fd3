"""Small seeded test models built in code, and the one equivalence helper tests use."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 8
OPSET = 17


def make_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
    initializers: Mapping[str, np.ndarray] | None = None,
    opset: int = OPSET,
    ir_version: int = IR_VERSION,
) -> onnx.ModelProto:
    """A checked model with explicit IR version and opset."""
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in (initializers or {}).items()]
    graph = helper.make_graph(list(nodes), "test", list(inputs), list(outputs), inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    onnx.checker.check_model(model, full_check=True)
    return model


def tensor(name: str, shape: Sequence[int | str | None], dtype: int = TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, list(shape))


def conv_bn_model(
    seed: int = 0,
    c_in: int = 3,
    c_out: int = 8,
    k: int = 3,
    groups: int = 1,
    bias: bool = True,
    spatial: int = 2,
    size: int = 8,
    batch: int | str = 1,
) -> onnx.ModelProto:
    """x -> Conv -> BatchNormalization -> Relu -> y, with non-trivial BN statistics."""
    rng = np.random.default_rng(seed)
    kshape = [k] * spatial
    inits = {
        "W": rng.standard_normal([c_out, c_in // groups, *kshape]).astype(np.float32),
        "gamma": rng.uniform(0.5, 1.5, c_out).astype(np.float32),
        "beta": rng.standard_normal(c_out).astype(np.float32),
        "mean": rng.standard_normal(c_out).astype(np.float32),
        "var": rng.uniform(0.5, 2.0, c_out).astype(np.float32),
    }
    conv_inputs = ["x", "W"]
    if bias:
        inits["B"] = rng.standard_normal(c_out).astype(np.float32)
        conv_inputs.append("B")
    nodes = [
        helper.make_node("Conv", conv_inputs, ["c"], name="conv", group=groups,
                         pads=[k // 2] * (2 * spatial)),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["bn"],
                         name="bn", epsilon=1e-3),
        helper.make_node("Relu", ["bn"], ["y"], name="relu"),
    ]
    return make_model(
        nodes,
        [tensor("x", [batch, c_in, *[size] * spatial])],
        [tensor("y", [batch, c_out, *[size] * spatial])],
        inits,
    )


def random_feeds(model: onnx.ModelProto, seed: int, batch: int = 2) -> dict[str, np.ndarray]:
    """Seeded standard-normal inputs for every graph input (symbolic dims -> ``batch``)."""
    rng = np.random.default_rng(seed)
    inits = {i.name for i in model.graph.initializer}
    feeds = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else batch
                for d in inp.type.tensor_type.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
        feeds[inp.name] = rng.standard_normal(dims).astype(dtype)
    return feeds


def run(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs on ORT CPU with all of ORT's graph optimizations off."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    return sess.run(None, dict(feeds))


def assert_equivalent(
    a: onnx.ModelProto,
    b: onnx.ModelProto,
    rtol: float,
    atol: float,
    seeds: Sequence[int] = (0, 1, 2),
    batch: int = 2,
) -> None:
    """``a`` and ``b`` give the same outputs on >= 3 seeded inputs (ORT_DISABLE_ALL)."""
    assert len(seeds) >= 3
    assert [o.name for o in a.graph.output] == [o.name for o in b.graph.output]
    for seed in seeds:
        feeds = random_feeds(a, seed, batch)
        for name, ya, yb in zip([o.name for o in a.graph.output], run(a, feeds), run(b, feeds),
                                strict=True):
            assert ya.shape == yb.shape, f"{name}: {ya.shape} != {yb.shape}"
            np.testing.assert_allclose(yb, ya, rtol=rtol, atol=atol, err_msg=name)


def op_count(model: onnx.ModelProto, op_type: str) -> int:
    return sum(1 for n in model.graph.node if n.op_type == op_type)


def conv_model(
    weight: np.ndarray,
    size: int = 12,
    bias: bool = True,
    seed: int = 0,
    batch: int | str = 1,
    **attrs: object,
) -> onnx.ModelProto:
    """x -> Conv(weight) -> y with the given attributes (output dims left to inference)."""
    rng = np.random.default_rng(seed)
    o, c_g = weight.shape[:2]
    c = c_g * int(attrs.get("group", 1))  # type: ignore[call-overload]
    inits = {"W": weight.astype(np.float32)}
    inputs = ["x", "W"]
    if bias:
        inits["B"] = rng.standard_normal(o).astype(np.float32)
        inputs.append("B")
    spatial = weight.ndim - 2
    nodes = [helper.make_node("Conv", inputs, ["y"], name="conv", **attrs)]
    return make_model(nodes, [tensor("x", [batch, c, *[size] * spatial])],
                      [tensor("y", [batch, o, *[None] * spatial])], inits)


def cp_kernel(o: int, c: int, kh: int, kw: int, rank: int, seed: int = 0) -> np.ndarray:
    """A kernel of exact CP rank ``rank``."""
    rng = np.random.default_rng(seed)
    a, b, v, h = (rng.standard_normal(s) for s in [(o, rank), (c, rank), (kh, rank),
                                                   (kw, rank)])
    return np.einsum("or,cr,ir,jr->ocij", a, b, v, h).astype(np.float32)


def calibration(model: onnx.ModelProto, n: int = 4, batch: int = 2):
    """A real-looking (non-synthetic) calibration set of seeded random batches."""
    from onnxcomp.calibration import Calibration

    return Calibration([random_feeds(model, 100 + s, batch) for s in range(n)], False, "test")


def relative_error(a: onnx.ModelProto, b: onnx.ModelProto, calib) -> float:
    """Relative L2 error of b's first output vs a's over the calibration batches."""
    ya = np.concatenate([run(a, batch)[0] for batch in calib.batches])
    yb = np.concatenate([run(b, batch)[0] for batch in calib.batches])
    return float(np.linalg.norm(yb - ya) / np.linalg.norm(ya))


def loud_channels_model(weight: np.ndarray, loud: int, size: int = 8,
                        **attrs: object) -> onnx.ModelProto:
    """x -> 1x1 "scale" (the first ``loud`` channels x30) -> Conv(weight) "conv" -> y.

    Inputs that live mostly in a few channels: what the data bases are for.
    """
    o, c = weight.shape[:2]
    scale = np.ones(c, np.float32)
    scale[:loud] = 30.0
    nodes = [helper.make_node("Conv", ["x", "S"], ["s"], name="scale"),
             helper.make_node("Conv", ["s", "W"], ["y"], name="conv", **attrs)]
    return make_model(nodes, [tensor("x", [1, c, size, size])], [tensor("y", [1, o, size, size])],
                      {"S": np.diag(scale).reshape(c, c, 1, 1), "W": weight.astype(np.float32)})


def basis_errors(pass_, model: onnx.ModelProto, calib, **config) -> dict[str, float]:
    """Output error of ``pass_`` at fixed rank, without refit, with each ``--basis``.

    Also checks that the report names the basis used (the "scale" stage is left alone).
    """
    from onnxcomp.decompose import LowRankConfig

    errors = {}
    for basis in ("data", "weights"):
        cfg = LowRankConfig(refit=False, basis=basis, exclude=("scale",), **config)
        result = pass_(model, cfg, calib)
        assert result.report.applied[0].details["basis"] == basis
        errors[basis] = relative_error(model, result.model, calib)
    return errors


def vgg_bn_unet(seed: int = 0, width: int = 8, size: int = 32, offset: float = 8.0,
                calib_samples: int = 8) -> onnx.ModelProto:
    """A small VGG-BN U-Net text detector (CRAFT-like), BN statistics fitted to the data.

    conv-BN-ReLU stages with MaxPools; a skip taken from a BN output before its Relu (CRAFT's
    slice boundaries) and one that feeds a MaxPool and a Concat with no Relu between; a
    MaxPool(3, 1, 1) -> dilated conv -> 1x1 conv pair with nothing between; two upsampling
    stages (bilinear Resize to sizes computed at run time from Shape/Gather/Slice/Cast, then
    Concat with the skip); a 2-channel head whose output is transposed to NHWC.

    Every conv has a bias of scale ``offset`` that its BN removes again (BN mean and variance
    are measured on ``calib_samples`` seeded inputs in [0, 1], stage by stage, as training
    leaves them): the conv outputs sit far from zero while what the BN passes on is small.
    """
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: dict[str, np.ndarray] = {}
    bns: list[tuple[str, str, int]] = []  # (BN name, its input, channels)
    counter = [0]

    def fresh(prefix: str) -> str:
        counter[0] += 1
        return f"{prefix}{counter[0]}"

    def node(op: str, inputs: list[str], prefix: str, **attrs: object) -> str:
        out = fresh(prefix)
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def conv(x: str, cin: int, cout: int, k: int = 3, dilation: int = 1, bn: bool = True,
             relu: bool = True) -> str:
        name = fresh("conv")
        std = np.sqrt(2.0 / (cin * k * k))
        inits[f"{name}.w"] = (std * rng.standard_normal((cout, cin, k, k))).astype(np.float32)
        bias = offset * rng.standard_normal(cout) if bn else 0.1 * rng.standard_normal(cout)
        inits[f"{name}.b"] = bias.astype(np.float32)
        pad = dilation * (k // 2)
        nodes.append(helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [name], name=name,
                                      kernel_shape=[k, k], pads=[pad] * 4,
                                      dilations=[dilation] * 2))
        y = name
        if bn:
            b = fresh("bn")
            inits[f"{b}.scale"] = rng.uniform(0.5, 1.5, cout).astype(np.float32)
            inits[f"{b}.shift"] = (0.3 * rng.standard_normal(cout)).astype(np.float32)
            inits[f"{b}.mean"] = np.zeros(cout, np.float32)
            inits[f"{b}.var"] = np.ones(cout, np.float32)
            nodes.append(helper.make_node(
                "BatchNormalization", [y, f"{b}.scale", f"{b}.shift", f"{b}.mean", f"{b}.var"],
                [b], name=b, epsilon=1e-5))
            bns.append((b, y, cout))
            y = b
        return node("Relu", [y], "relu") if relu else y

    def pool(x: str, k: int = 2, stride: int = 2, pad: int = 0) -> str:
        return node("MaxPool", [x], "pool", kernel_shape=[k, k], strides=[stride] * 2,
                    pads=[pad] * 4)

    def resize_to(x: str, like: str) -> str:
        """Bilinear Resize of ``x`` to the spatial size of ``like``, computed at run time."""
        idx = fresh("idx")
        inits[f"{idx}.nc"] = np.array([0, 1], np.int64)
        inits[f"{idx}.start"] = np.array([2], np.int64)
        inits[f"{idx}.end"] = np.array([4], np.int64)
        nc = node("Gather", [node("Shape", [x], "shape"), f"{idx}.nc"], "gather", axis=0)
        hw = node("Slice", [node("Shape", [like], "shape"), f"{idx}.start", f"{idx}.end"],
                  "slice")
        hw = node("Cast", [node("Cast", [hw], "cast", to=TensorProto.FLOAT)], "cast",
                  to=TensorProto.INT64)
        sizes = node("Concat", [nc, hw], "sizes", axis=0)
        return node("Resize", [x, "", "", sizes], "resize", mode="linear")

    w = width
    x = conv("x", 3, w)
    skip1 = conv(x, w, w, relu=False)                # BN output -> Relu and -> Concat
    x = conv(pool(node("Relu", [skip1], "relu")), w, 2 * w)
    skip2 = conv(x, 2 * w, 2 * w, relu=False)        # BN output -> MaxPool and -> Concat
    x = conv(pool(skip2), 2 * w, 4 * w)
    skip3 = conv(x, 4 * w, 4 * w, relu=False)
    x = conv(pool(skip3, 3, 1, 1), 4 * w, 8 * w, dilation=2, bn=False, relu=False)
    x = conv(x, 8 * w, 8 * w, k=1, bn=False, relu=False)  # fc6 -> fc7, nothing between
    y = conv(node("Concat", [x, skip3], "cat", axis=1), 12 * w, 4 * w, k=1)
    y = conv(y, 4 * w, 2 * w)
    y = node("Concat", [resize_to(y, skip2), skip2], "cat", axis=1)
    y = conv(conv(y, 4 * w, 2 * w, k=1), 2 * w, w)
    y = node("Concat", [resize_to(y, skip1), skip1], "cat", axis=1)
    y = conv(conv(y, 2 * w, w, k=1), w, w)
    y = conv(conv(y, w, w, bn=False), w, 2, k=1, bn=False, relu=False)
    nodes.append(helper.make_node("Transpose", [y], ["y"], name="to_nhwc", perm=[0, 2, 3, 1]))
    model = make_model(nodes, [tensor("x", ["n", 3, size, size])],
                       [tensor("y", ["n", size, size, 2])], inits)
    # BN statistics as training leaves them: measured on the data, one BN after the other.
    feeds = np.random.default_rng(seed + 1).uniform(0, 1, (calib_samples, 3, size, size))
    feeds = feeds.astype(np.float32)
    for bn_name, conv_out, _ in bns:
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        probe.graph.output.append(tensor(conv_out, ["n", None, None, None]))
        sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
        t = sess.run([conv_out], {"x": feeds})[0]
        for init in model.graph.initializer:
            if init.name == f"{bn_name}.mean":
                init.CopyFrom(numpy_helper.from_array(
                    t.mean(axis=(0, 2, 3)).astype(np.float32), init.name))
            elif init.name == f"{bn_name}.var":
                init.CopyFrom(numpy_helper.from_array(
                    t.var(axis=(0, 2, 3)).astype(np.float32), init.name))
    onnx.checker.check_model(model, full_check=True)
    return model


def uniform_calibration(shape: Sequence[int], batches: int, seed: int = 0, name: str = "x"):
    """A calibration set of ``batches`` seeded batches of U(0, 1) images of ``shape``."""
    from onnxcomp.calibration import Calibration

    return Calibration([{name: np.random.default_rng(seed + s).uniform(0, 1, shape)
                         .astype(np.float32)} for s in range(batches)], False, f"U(0,1) {seed}")


def yolo_head(c_in: int = 16, classes: int = 6, size: int = 12, seed: int = 0,
              channels: int = 32):
    """A detector-style model: convs, then boxes (4 channels) and sigmoid class scores
    concatenated into one ``[N, 4 + classes, anchors]`` output (YOLOv8's export layout).

    Class biases are spread so that some scores sit above 0.5 and most below, as a trained
    detector's do.
    """
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal([channels, c_in, 3, 3]) / np.sqrt(c_in * 9)).astype(np.float32)
    w2 = (rng.standard_normal([channels, channels, 3, 3]) / np.sqrt(channels * 9)).astype(
        np.float32)
    wb = (rng.standard_normal([4, channels, 1, 1]) / np.sqrt(channels)).astype(np.float32)
    wc = (rng.standard_normal([classes, channels, 1, 1]) * 3 / np.sqrt(channels)).astype(
        np.float32)
    bc = np.linspace(-3.0, 0.5, classes).astype(np.float32)
    anchors = size * size
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["a"], name="c1", pads=[1] * 4),
        helper.make_node("Relu", ["a"], ["ra"], name="r1"),
        helper.make_node("Conv", ["ra", "W2"], ["b"], name="c2", pads=[1] * 4),
        helper.make_node("Relu", ["b"], ["rb"], name="r2"),
        helper.make_node("Conv", ["rb", "WB"], ["box4"], name="box"),
        helper.make_node("Conv", ["rb", "WC", "BC"], ["cls4"], name="cls"),
        helper.make_node("Reshape", ["box4", "shape_b"], ["box3"], name="rs_b"),
        helper.make_node("Reshape", ["cls4", "shape_c"], ["cls3"], name="rs_c"),
        helper.make_node("Sigmoid", ["cls3"], ["score"], name="sig"),
        helper.make_node("Concat", ["box3", "score"], ["y"], name="cat", axis=1),
    ]
    inits = {"W1": w1, "W2": w2, "WB": wb, "WC": wc, "BC": bc,
             "shape_b": np.array([1, 4, anchors], np.int64),
             "shape_c": np.array([1, classes, anchors], np.int64)}
    return make_model(nodes, [tensor("x", [1, c_in, size, size])],
                      [tensor("y", [1, 4 + classes, anchors])], inits)
