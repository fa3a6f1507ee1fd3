from __future__ import annotations

import numpy as np
import pytest
from builders import assert_equivalent, make_model, op_count, tensor
from onnx import helper

from onnxcomp.passbase import SkipReason
from onnxcomp.passes import REGISTRY
from onnxcomp.passes.fold_affine import FoldAffineConfig

fold_affine = REGISTRY["fold_affine"]
LOSSLESS = {"rtol": 1e-4, "atol": 1e-5}
RNG = np.random.default_rng(0)


def w(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def run_pass(model):
    before = model.SerializeToString()
    result = fold_affine(model, FoldAffineConfig())
    assert model.SerializeToString() == before  # the input is never modified
    return result


@pytest.mark.parametrize("const_shape", [[], [1], [8, 1, 1], [1, 8, 1, 1]])
def test_scale_and_shift_after_conv_fold_into_it(const_shape):
    """Conv -> Mul(s) -> Add(t): both fold into the conv's weights and bias."""
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv", pads=[1] * 4),
             helper.make_node("Mul", ["S", "c"], ["m"], name="scale"),
             helper.make_node("Add", ["m", "T"], ["y"], name="shift")]
    size = int(np.prod(const_shape)) if const_shape else 1
    inits = {"W": w(8, 4, 3, 3), "B": w(8), "S": w(size).reshape(const_shape),
             "T": w(size).reshape(const_shape)}
    model = make_model(nodes, [tensor("x", [1, 4, 6, 6])], [tensor("y", [1, 8, 6, 6])], inits)
    result = run_pass(model)
    assert [c.node for c in result.report.applied] == ["scale", "shift"]
    assert op_count(result.model, "Mul") == op_count(result.model, "Add") == 0
    assert_equivalent(model, result.model, **LOSSLESS)


def test_scale_and_shift_before_unpadded_conv_fold_into_it():
    """x -> Mul -> Add -> 1x1 Conv (and a second 1x1 Conv): folded into both readers."""
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Mul", ["r", "S"], ["m"], name="scale"),
             helper.make_node("Add", ["m", "T"], ["a"], name="shift"),
             helper.make_node("Conv", ["a", "W1", "B1"], ["y1"], name="pw1"),
             helper.make_node("Conv", ["a", "W2"], ["y2"], name="pw2", strides=[2, 2])]
    inits = {"S": w(1, 4, 1, 1), "T": w(4, 1, 1), "W1": w(8, 4, 1, 1), "B1": w(8),
             "W2": w(6, 4, 1, 1)}
    model = make_model(nodes, [tensor("x", [1, 4, 6, 6])],
                       [tensor("y1", [1, 8, 6, 6]), tensor("y2", [1, 6, 3, 3])], inits)
    result = run_pass(model)
    assert len(result.report.applied) == 2
    assert all(c.details["side"] == "before" for c in result.report.applied)
    assert op_count(result.model, "Conv") == 2 and op_count(result.model, "Add") == 0
    assert_equivalent(model, result.model, **LOSSLESS)


def _affine_before_padded_depthwise(shift: np.ndarray):
    """relu -> Mul(0.5) -> Add(shift) -> padded depthwise 3x3 conv."""
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Mul", ["r", "S"], ["m"], name="scale"),
             helper.make_node("Add", ["m", "T"], ["a"], name="shift"),
             helper.make_node("Conv", ["a", "W"], ["y"], name="dw", pads=[1] * 4, group=4)]
    inits = {"S": np.array(0.5, np.float32), "T": shift.astype(np.float32), "W": w(4, 1, 3, 3)}
    return make_model(nodes, [tensor("x", [1, 4, 6, 6])], [tensor("y", [1, 4, 6, 6])], inits)


def test_shift_before_padded_conv_becomes_one_batchnorm():
    """Mul -> Add before a padded conv cannot fold (the border): one BatchNormalization."""
    model = _affine_before_padded_depthwise(np.array([0.25, -1, 2, 0]).reshape(4, 1, 1))
    result = run_pass(model)
    assert [c.node for c in result.report.applied] == ["scale"]
    assert result.report.applied[0].details["nodes"] == ["scale", "shift"]
    assert not result.report.skipped
    assert op_count(result.model, "BatchNormalization") == 1
    assert op_count(result.model, "Mul") == op_count(result.model, "Add") == 0
    assert_equivalent(model, result.model, **LOSSLESS)


@pytest.mark.parametrize("chain", [["Add", "Mul"], ["Mul"], ["Add"]])
def test_affine_between_activation_and_pool_becomes_batchnorm(chain):
    """conv -> x*HardSigmoid(x) -> affine chain -> GlobalAveragePool: converted (either order)."""
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
             helper.make_node("HardSigmoid", ["c"], ["g"], name="gate"),
             helper.make_node("Mul", ["c", "g"], ["h"], name="hswish")]
    inits = {"W": w(4, 3, 1, 1)}
    prev = "h"
    for i, op in enumerate(chain):
        inits[f"K{i}"] = w(1, 4, 1, 1)
        nodes.append(helper.make_node(op, [prev, f"K{i}"], [f"a{i}"], name=f"affine{i}"))
        prev = f"a{i}"
    nodes.append(helper.make_node("GlobalAveragePool", [prev], ["y"], name="pool"))
    model = make_model(nodes, [tensor("x", [1, 3, 5, 5])], [tensor("y", [1, 4, 1, 1])], inits)
    result = run_pass(model)
    assert len(result.report.applied) == 1 and not result.report.skipped
    assert op_count(result.model, "BatchNormalization") == 1
    assert op_count(result.model, "Mul") == 1  # the swish's own Mul
    assert_equivalent(model, result.model, **LOSSLESS)


def test_batchnorm_off_keeps_the_shift_with_its_reason():
    model = _affine_before_padded_depthwise(np.array([0.25]))
    result = fold_affine(model, FoldAffineConfig(batchnorm=False))
    skipped = {s.node: s for s in result.report.skipped}
    assert skipped["shift"].reason == SkipReason.UNSUPPORTED_ATTRIBUTE
    assert "padded" in skipped["shift"].detail
    # The Mul cannot go past the Add into the conv either (the Add reads it): it stays too.
    assert skipped["scale"].reason == SkipReason.UNSUPPORTED_PRODUCER
    assert op_count(result.model, "Add") == 1
    assert_equivalent(model, result.model, **LOSSLESS)


def test_scalar_scale_folds_into_a_depthwise_reader():
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Mul", ["r", "S"], ["m"], name="scale"),
             helper.make_node("Conv", ["m", "W"], ["y"], name="dw", pads=[1] * 4, group=4)]
    inits = {"S": np.array([1.5], np.float32), "W": w(4, 1, 3, 3)}
    model = make_model(nodes, [tensor("x", [1, 4, 6, 6])], [tensor("y", [1, 4, 6, 6])], inits)
    result = run_pass(model)
    assert [c.node for c in result.report.applied] == ["scale"]
    assert_equivalent(model, result.model, **LOSSLESS)


@pytest.mark.parametrize(("case", "reason"), [
    ("shared_output", SkipReason.MULTIPLE_CONSUMERS),
    ("spatial_constant", SkipReason.UNSUPPORTED_ATTRIBUTE),
    ("shared_weight", SkipReason.SHARED_WEIGHT),
    ("weight_input", SkipReason.NOT_CONSTANT),
])
def test_unfoldable_cases_are_skipped_with_reasons(case, reason):
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv"),
             helper.make_node("Mul", ["c", "S"], ["y"], name="scale")]
    inits = {"W": w(4, 4, 1, 1), "B": w(4), "S": w(4, 1, 1)}
    inputs = [tensor("x", [1, 4, 5, 5])]
    outputs = [tensor("y", [1, 4, 5, 5])]
    if case == "shared_output":
        outputs.append(tensor("c", [1, 4, 5, 5]))
    elif case == "spatial_constant":
        inits["S"] = w(4, 5, 5)
    elif case == "shared_weight":
        nodes.append(helper.make_node("Conv", ["x", "W"], ["z"], name="other"))
        outputs.append(tensor("z", [1, 4, 5, 5]))
    else:
        del inits["W"]
        inputs.append(tensor("W", [4, 4, 1, 1]))
    model = make_model(nodes, inputs, outputs, inits)
    result = run_pass(model)
    assert not result.report.applied
    assert result.report.skipped[0].node == "scale"
    assert result.report.skipped[0].reason == reason
    assert op_count(result.model, "Mul") == 1


def test_integer_constants_are_not_candidates_for_folding():
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
             helper.make_node("Cast", ["c"], ["ci"], name="cast", to=7),
             helper.make_node("Mul", ["ci", "K"], ["y"], name="scale")]
    inits = {"W": w(4, 4, 1, 1), "K": np.array([2], np.int64)}
    model = make_model(nodes, [tensor("x", [1, 4, 5, 5])], [tensor("y", [1, 4, 5, 5], 7)],
                       inits)
    result = run_pass(model)
    assert result.report.skipped[0].reason == SkipReason.UNSUPPORTED_DTYPE


def test_affine_without_a_conv_layout_neighbour_stays():
    """Relu -> Mul -> Softmax (no conv or pool near): nothing to gain, the Mul keeps its reason."""
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Mul", ["r", "S"], ["m"], name="scale"),
             helper.make_node("Softmax", ["m"], ["y"], name="softmax", axis=1)]
    model = make_model(nodes, [tensor("x", [1, 4, 6, 6])], [tensor("y", [1, 4, 6, 6])],
                       {"S": w(1, 4, 1, 1)})
    result = run_pass(model)
    assert not result.report.applied
    assert result.report.skipped[0].reason == SkipReason.UNSUPPORTED_PRODUCER
    assert op_count(result.model, "BatchNormalization") == 0
