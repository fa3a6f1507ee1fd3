from __future__ import annotations

import numpy as np
import onnx
from builders import uniform_calibration, vgg_bn_unet
from onnx import numpy_helper

from onnxcomp import capture
from onnxcomp.stream import LayerStream


def _convs(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == "Conv"]


def _full(model, names, calib):
    batches = list(capture.iter_capture(model, names, calib))
    return {n: [b[n] for b in batches] for n in names}


def test_stream_matches_whole_model_runs_and_runs_each_node_once():
    model = vgg_bn_unet(width=4, size=16)
    calib = uniform_calibration((3, 3, 16, 16), batches=3)
    names = [c.input[0] for c in _convs(model)] + [_convs(model)[-1].output[0]]
    want = _full(model, names, calib)
    with LayerStream(calib, threads=1) as stream:
        for name in names:  # graph order, like a layer-wise rewrite
            got = stream.batches(model, name)
            for a, b in zip(got, want[name], strict=True):
                np.testing.assert_array_equal(a, b)
        needed = len(model.graph.node) - 1  # all but the final Transpose
        assert stream.nodes_run == needed
        assert stream.segments <= len(names)


def test_a_rewrite_after_its_input_was_read_is_seen_downstream():
    """Layer k is rewritten after its input was taken: later tensors see the new layer."""
    model = vgg_bn_unet(width=4, size=16)
    calib = uniform_calibration((2, 3, 16, 16), batches=2)
    convs = _convs(model)
    current = model
    with LayerStream(calib, threads=1) as stream:
        for conv in convs[:6]:
            stream.batches(current, conv.input[0])
            edited = onnx.ModelProto()
            edited.CopyFrom(current)
            w = next(i for i in edited.graph.initializer if i.name == conv.input[1])
            w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * 0.5, w.name))
            current = edited
        last = convs[-1].output[0]
        got = stream.batches(current, last)
    want = _full(current, [last], calib)[last]
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert not np.allclose(want[0], _full(model, [last], calib)[last][0])


def test_over_the_budget_tensors_spill_to_disk_and_come_back_the_same():
    model = vgg_bn_unet(width=4, size=16)
    calib = uniform_calibration((2, 3, 16, 16), batches=2)
    names = [c.input[0] for c in _convs(model)]
    want = _full(model, names, calib)
    with LayerStream(calib, budget_bytes=0, threads=1) as stream:
        for name in names:
            for a, b in zip(stream.batches(model, name), want[name], strict=True):
                np.testing.assert_array_equal(a, b)
        assert stream.peak_bytes == 0
        assert stream._store.spilled  # skips and the frontier went to disk
        folder = stream._store._tmp.name
    import os

    assert not os.path.exists(folder)


def test_tensors_no_node_left_reads_are_released():
    model = vgg_bn_unet(width=4, size=16)
    calib = uniform_calibration((2, 3, 16, 16), batches=1)
    convs = _convs(model)
    with LayerStream(calib, threads=1) as stream:
        stream.batches(model, convs[-1].output[0])
        # Everything upstream of the last conv has been read: only it is kept.
        assert stream._store.names() == [convs[-1].output[0]]
