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
    from onnxcomp.calibrate import Calibration

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
