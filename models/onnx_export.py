"""Export torch modules to ONNX the way the reference models need it, and check the result.

Uses the TorchScript-based exporter (``dynamo=False``): it needs no onnxscript, and it can keep
BatchNormalization as separate nodes. With ``keep_bn=False`` the model is exported in EVAL mode,
where the exporter folds every BatchNormalization into the Conv before it (the usual deployed
form). With ``keep_bn=True`` it is exported in PRESERVE mode with the module in eval mode, which
skips that folding and writes inference-mode BatchNormalization nodes (``training_mode=0``).
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper

OPSET = 17
log = logging.getLogger(__name__)


def export_onnx(
    module: torch.nn.Module,
    example: torch.Tensor,
    path: Path,
    *,
    keep_bn: bool,
    dynamic_batch: bool = False,
    input_name: str = "input",
    output_name: str = "logits",
    doc: str = "",
) -> onnx.ModelProto:
    """Export ``module`` (in eval mode) to ``path`` at opset 17, check it and return it."""
    module = module.eval()
    mode = torch.onnx.TrainingMode.PRESERVE if keep_bn else torch.onnx.TrainingMode.EVAL
    dynamic_axes = {input_name: {0: "batch"}, output_name: {0: "batch"}} if dynamic_batch else None
    tmp = path.with_suffix(".tmp.onnx")
    with warnings.catch_warnings():
        # The legacy exporter warns that it is deprecated, and that constant folding is risky in
        # PRESERVE mode; neither applies to an eval-mode module.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example,),
            str(tmp),
            dynamo=False,
            opset_version=OPSET,
            input_names=[input_name],
            output_names=[output_name],
            dynamic_axes=dynamic_axes,
            training=mode,
            do_constant_folding=True,
        )
    model = onnx.load(str(tmp))
    tmp.unlink()
    fold_constant_subgraphs(model)
    fuse_pad_into_conv(model)
    model.doc_string = doc
    onnx.checker.check_model(model, full_check=True)
    ops = op_counts(model)
    if keep_bn and ops["BatchNormalization"] == 0:
        raise RuntimeError(f"{path.name}: BatchNormalization was folded although keep_bn=True")
    if not keep_bn and ops["BatchNormalization"] != 0:
        raise RuntimeError(f"{path.name}: {ops['BatchNormalization']} BatchNormalization left")
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(tmp))
    tmp.replace(path)
    log.info("wrote %s (%s)", path, dict(ops))
    return model


def fold_constant_subgraphs(model: onnx.ModelProto) -> int:
    """Replace every node whose inputs are all constant by initializers, in place.

    The exporter leaves small constant subgraphs behind when constant folding does not run (in
    PRESERVE mode): ``Constant`` nodes, the Concat/Reshape/Slice/Cast chains that compute the
    ``pads`` of a Pad, and ``Identity(initializer)`` nodes for parameters that it deduplicated.
    Graph rewrites should see plain initializers instead. Each such node is evaluated with
    :class:`onnx.reference.ReferenceEvaluator`. Returns the number of nodes folded.
    """
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    graph_outputs = {o.name for o in graph.output}
    keep, folded = [], 0
    for node in graph.node:
        inputs = [name for name in node.input if name]
        constant = all(name in values for name in inputs) and not node.op_type.startswith("Random")
        if not constant or any(name in graph_outputs for name in node.output):
            keep.append(node)
            continue
        feeds = {name: values[name] for name in inputs}
        results = ReferenceEvaluator(node).run(None, feeds)
        for name, value in zip(node.output, results, strict=True):
            values[name] = np.asarray(value)
            graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        folded += 1
    del graph.node[:]
    graph.node.extend(keep)
    _drop_unused_initializers(model)
    return folded


def fuse_pad_into_conv(model: onnx.ModelProto) -> int:
    """Merge a zero ``Pad`` of the spatial axes into the ``pads`` of the Conv it feeds, in place.

    TensorFlow-trained weights need "SAME" padding, which is asymmetric for strided convs; the
    exporter writes it as Pad -> Conv(pads=0). ONNX Conv supports asymmetric ``pads``, so the
    pair becomes one Conv. Only a constant-mode Pad with value 0, zero padding on N and C, and a
    single consumer that is a Conv with ``auto_pad`` NOTSET is fused. Returns the number fused.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in graph.output}
    removed = []
    for pad in graph.node:
        if pad.op_type != "Pad" or len(pad.input) < 2 or pad.input[1] not in inits:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in pad.attribute}
        if attrs.get("mode", b"constant") not in (b"constant", "constant"):
            continue
        value = pad.input[2] if len(pad.input) > 2 else ""
        if value and (value not in inits or np.any(numpy_helper.to_array(inits[value]))):
            continue
        if len(pad.input) > 3 and pad.input[3]:  # explicit axes (opset 18+): not handled
            continue
        pads = numpy_helper.to_array(inits[pad.input[1]]).astype(np.int64)
        users = consumers.get(pad.output[0], [])
        if len(pads) != 8 or np.any(pads < 0) or np.any(pads[[0, 1, 4, 5]] != 0):
            continue
        if len(users) != 1 or users[0].op_type != "Conv" or pad.output[0] in graph_outputs:
            continue
        conv = users[0]
        conv_attrs = {a.name: onnx.helper.get_attribute_value(a) for a in conv.attribute}
        if conv_attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            continue
        if conv.input[0] != pad.output[0]:
            continue
        old = list(conv_attrs.get("pads", [0, 0, 0, 0]))
        new = [old[0] + pads[2], old[1] + pads[3], old[2] + pads[6], old[3] + pads[7]]
        for attr in list(conv.attribute):
            if attr.name == "pads":
                conv.attribute.remove(attr)
        conv.attribute.append(onnx.helper.make_attribute("pads", [int(p) for p in new]))
        conv.input[0] = pad.input[0]
        removed.append(pad)
    for pad in removed:
        graph.node.remove(pad)
    _drop_unused_initializers(model)
    return len(removed)


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    graph = model.graph
    used = {name for node in graph.node for name in node.input}
    used |= {o.name for o in graph.output}
    for t in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(t)


def op_counts(model: onnx.ModelProto) -> Counter[str]:
    """Count the nodes of the main graph by op_type."""
    return Counter(node.op_type for node in model.graph.node)


def ort_session(path: Path, threads: int = 1) -> ort.InferenceSession:
    """Open ``path`` in onnxruntime on the CPU with a fixed, small thread count."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def max_abs_diff_vs_torch(path: Path, module: torch.nn.Module, batch: np.ndarray) -> float:
    """Run ``batch`` through the ONNX file and the torch module; return the max abs difference.

    The batch is fed one sample at a time when the ONNX input has a fixed batch of 1.
    """
    session = ort_session(path, threads=2)
    name = session.get_inputs()[0].name
    fixed_one = session.get_inputs()[0].shape[0] == 1
    with torch.no_grad():
        expected = module.eval()(torch.from_numpy(batch)).numpy()
    if fixed_one:
        outputs = [session.run(None, {name: batch[i : i + 1]})[0] for i in range(len(batch))]
        got = np.concatenate(outputs)
    else:
        got = session.run(None, {name: batch})[0]
    return float(np.max(np.abs(got - expected)))
