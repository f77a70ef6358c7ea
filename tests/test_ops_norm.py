"""Normalization ops, dropout and cross-entropy with class labels, in process through the real plan.

Every row of `tests.op_tables.norm` against central finite differences (inference mode), batch_norm and
dropout in training mode against finite differences too, float32 staying float32, and forward values and
VJPs against PyTorch: F.batch_norm (training and eval, running statistics over several steps),
F.layer_norm, F.instance_norm, F.group_norm, F.local_response_norm, F.dropout and F.cross_entropy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import chainrule.client as cr
from chainrule import tensors
from chainrule.server.errors import InvalidArgument
from chainrule.server.graph import build_graph
from chainrule.server.ops import INFERENCE, Mode
from chainrule.server.plan import Plan
from chainrule.v1 import graph_pb2
from tests.gradcheck import (
    Array,
    AttrLike,
    OpCase,
    check_grads,
    check_op,
    declared_inputs,
    input_node,
    make_graph,
    node,
    parameter,
    run_backward,
    run_op,
)
from tests.op_tables.norm import CASES, batch_norm_args, class_labels, per_channel

TRAINING = Mode(training=True, seed=3, step=5)
RNG = np.random.default_rng(11)


def state(name: str, value: Array) -> graph_pb2.Node:
    return graph_pb2.Node(name=name, op="state", value=tensors.encode(np.asarray(value), name))


def through_plan(
    op: str,
    args: Sequence[Array],
    cotangent: Array,
    mode: Mode = INFERENCE,
    dtype: type = np.float64,
    **attrs: AttrLike | None,
) -> tuple[Array, list[Array | None]]:
    """The op's value and the gradient of every float argument (None for the others) for `cotangent`."""
    case = OpCase(op, op, tuple(args), attrs)
    feeds = case.feeds(dtype)
    result = run_backward(
        case.nodes(dtype),
        feeds,
        loss="out",
        wrt=case.differentiable(),
        loss_grad=np.asarray(cotangent, dtype),
        mode=mode,
    )
    return result.loss, [result.grads.get(name) for name in feeds]


def through_torch(
    function: Callable[..., torch.Tensor], args: Sequence[Array], cotangent: Array
) -> tuple[Array, list[Array | None]]:
    inputs = [torch.tensor(arg, requires_grad=np.asarray(arg).dtype.kind == "f") for arg in args]
    out = function(*inputs)
    out.backward(torch.tensor(cotangent))
    return out.detach().numpy(), [None if t.grad is None else t.grad.numpy() for t in inputs]


def assert_matches_torch(
    ours: tuple[Array, list[Array | None]], theirs: tuple[Array, list[Array | None]], rtol: float = 1e-10
) -> None:
    np.testing.assert_allclose(ours[0], theirs[0], rtol=rtol, atol=rtol)
    assert len(ours[1]) == len(theirs[1])
    for position, (mine, reference) in enumerate(zip(ours[1], theirs[1], strict=True)):
        if reference is not None:
            assert mine is not None, f"no gradient for argument {position}"
            np.testing.assert_allclose(mine, reference, rtol=rtol, atol=rtol, err_msg=f"argument {position}")


# ---------------------------------------------------------------- finite differences and dtypes
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_op_gradient_matches_finite_differences(case: OpCase) -> None:
    check_op(case)


FLOAT32_CASES = {case.op: case for case in CASES}.values()


@pytest.mark.parametrize("case", FLOAT32_CASES, ids=lambda case: case.id)
def test_float32_stays_float32(case: OpCase) -> None:
    result = run_op(case, case.cotangent().astype(np.float32), dtype=np.float32)
    assert result.loss.dtype == np.float32
    for name, grad in result.grads.items():
        assert grad.dtype == np.float32, name


@pytest.mark.parametrize("x", [(4, 3), (2, 3, 4), (3, 2, 2, 2)])
def test_batch_norm_training_gradient_passes_through_the_batch_statistics(x: tuple[int, ...]) -> None:
    args = batch_norm_args(x)
    names = ["x", "scale", "bias", "mean", "var"]
    feeds = dict(zip(names, args, strict=True))
    nodes = [*declared_inputs(feeds), node("out", "batch_norm", *names, momentum=0.2)]
    cotangent = RNG.standard_normal(x)
    result = check_grads(nodes, feeds, loss="out", wrt=names[:3], loss_grad=cotangent, mode=TRAINING)
    assert not np.allclose(result.grads["x"], cotangent * args[1].reshape(1, -1, *[1] * (len(x) - 2)))
    running = run_backward(nodes, feeds, loss="out", wrt=names[3:], loss_grad=cotangent, mode=TRAINING)
    for name in names[3:]:
        np.testing.assert_array_equal(running.grads[name], np.zeros_like(feeds[name]))


def test_dropout_training_gradient_is_the_forward_mask() -> None:
    x = RNG.standard_normal((5, 6))
    nodes = [*declared_inputs({"x": x}), node("out", "dropout", "x", ratio=0.3)]
    result = check_grads(nodes, {"x": x}, loss="out", loss_grad=RNG.standard_normal(x.shape), mode=TRAINING)
    [out] = Plan(build_graph(make_graph(nodes))).forward({"x": x}, {}, ["out"], mode=TRAINING)
    ones = run_backward(nodes, {"x": x}, loss="out", wrt=["x"], loss_grad=np.ones(x.shape), mode=TRAINING)
    np.testing.assert_array_equal(ones.grads["x"], np.where(out != 0, 1 / 0.7, 0.0))
    assert 0 < np.count_nonzero(out) < x.size
    np.testing.assert_array_equal(result.loss, out)


@pytest.mark.parametrize("op", ["batch_norm", "dropout"])
def test_float32_stays_float32_in_training_mode(op: str) -> None:
    args = batch_norm_args((4, 3, 2)) if op == "batch_norm" else (RNG.standard_normal((4, 3)),)
    value, grads = through_plan(op, args, RNG.standard_normal(args[0].shape), TRAINING, np.float32)
    assert value.dtype == np.float32
    assert all(grad is None or grad.dtype == np.float32 for grad in grads)


# ---------------------------------------------------------------- against PyTorch
@pytest.mark.parametrize("x", [(6, 3), (4, 3, 5), (2, 3, 4, 2)])
@pytest.mark.parametrize("training", [False, True])
def test_batch_norm_matches_torch(x: tuple[int, ...], training: bool) -> None:
    args = batch_norm_args(x)
    cotangent = RNG.standard_normal(x)
    mode = TRAINING if training else INFERENCE
    ours = through_plan("batch_norm", args, cotangent, mode, epsilon=1e-3)
    if training:  # torch takes no gradient to the running statistics in training mode
        theirs = through_torch(
            lambda x, s, b, m, v: F.batch_norm(x, m.detach(), v.detach(), s, b, training=True, eps=1e-3),
            args,
            cotangent,
        )
        theirs[1][3:] = [np.zeros(x[1]), np.zeros(x[1])]
    else:  # its eval mode takes none either, so the same formula written out gives them
        shape = (1, -1) + (1,) * (len(x) - 2)
        theirs = through_torch(
            lambda x, s, b, m, v: (
                (x - m.reshape(shape)) / torch.sqrt(v.reshape(shape) + 1e-3) * s.reshape(shape) + b.reshape(shape)
            ),
            args,
            cotangent,
        )
        reference = F.batch_norm(*(torch.tensor(a) for a in (args[0], args[3], args[4], args[1], args[2])), eps=1e-3)
        np.testing.assert_allclose(ours[0], reference.numpy(), rtol=1e-12, atol=1e-12)
    assert_matches_torch(ours, theirs)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_batch_norm_running_statistics_follow_torch_over_several_steps(dtype: type) -> None:
    """Each training step hands back running statistics as torch.nn.BatchNorm updates its buffers
    (unbiased variance, momentum in PyTorch's convention); state nodes only, through ctx.update_state."""
    x0, scale, bias, mean, var = batch_norm_args((8, 3, 2))
    nodes = [
        input_node("x", np.dtype(dtype).name, (8, 3, 2)),
        parameter("scale", scale.astype(dtype)),
        parameter("bias", bias.astype(dtype)),
        state("mean", mean.astype(dtype)),
        state("var", var.astype(dtype)),
        node("out", "batch_norm", "x", "scale", "bias", "mean", "var", momentum=0.25),
    ]
    plan = Plan(build_graph(make_graph(nodes)))
    stored = {"scale": scale.astype(dtype), "bias": bias.astype(dtype), "mean": mean.astype(dtype)}
    stored["var"] = var.astype(dtype)
    module = torch.nn.BatchNorm1d(3, momentum=0.25, dtype=torch.float64 if dtype == np.float64 else torch.float32)
    module.running_mean.copy_(torch.tensor(stored["mean"]))
    module.running_var.copy_(torch.tensor(stored["var"]))
    with torch.no_grad():
        module.weight.copy_(torch.tensor(stored["scale"]))
        module.bias.copy_(torch.tensor(stored["bias"]))
    for step in range(4):
        x = (RNG.standard_normal((8, 3, 2)) * (step + 1) + step).astype(dtype)
        updates: dict[str, Array] = {}
        [out] = plan.forward({"x": x}, stored, ["out"], mode=Mode(True, 0, step), state_updates=updates)
        assert sorted(updates) == ["mean", "var"]
        assert all(update.dtype == dtype and update.shape == (3,) for update in updates.values())
        stored.update(updates)
        expected = module(torch.tensor(x)).detach().numpy()
        tolerance = 1e-12 if dtype == np.float64 else 1e-5
        np.testing.assert_allclose(out, expected, rtol=tolerance, atol=tolerance)
        np.testing.assert_allclose(stored["mean"], module.running_mean.numpy(), rtol=tolerance, atol=tolerance)
        np.testing.assert_allclose(stored["var"], module.running_var.numpy(), rtol=tolerance, atol=tolerance)
    module.eval()
    x = RNG.standard_normal((8, 3, 2)).astype(dtype)
    [out] = plan.forward({"x": x}, stored, ["out"])
    np.testing.assert_allclose(out, module(torch.tensor(x)).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_batch_norm_updates_only_arguments_that_are_state_nodes() -> None:
    x, scale, bias, mean, var = batch_norm_args((4, 3))
    nodes = [
        input_node("x", "float64", (4, 3)),
        parameter("mean", mean),
        state("var", var),
        node("out", "batch_norm", "x", "mean", "mean", "mean", "var"),
    ]
    updates: dict[str, Array] = {}
    plan = Plan(build_graph(make_graph(nodes)))
    plan.forward({"x": x}, {"mean": mean, "var": var}, ["out"], mode=TRAINING, state_updates=updates)
    assert list(updates) == ["var"]
    inference: dict[str, Array] = {}
    plan.forward({"x": x}, {"mean": mean, "var": var}, ["out"], state_updates=inference)
    assert inference == {}


def test_batch_norm_training_refuses_one_value_per_channel_as_torch_does() -> None:
    args = batch_norm_args((1, 3))
    with pytest.raises(InvalidArgument, match="'out'.*more than one value per channel"):
        through_plan("batch_norm", args, np.ones((1, 3)), TRAINING)
    through_plan("batch_norm", args, np.ones((1, 3)))  # inference needs no batch statistics


@pytest.mark.parametrize(
    ("x", "axis", "affine"),
    [((3, 4), -1, ((4,), (4,))), ((2, 3, 4), 1, ((3, 4), (3, 4))), ((2, 3, 4), -3, ((2, 3, 4), (2, 3, 4)))],
)
def test_layer_norm_matches_torch(x: tuple[int, ...], axis: int, affine: tuple[tuple[int, ...], ...]) -> None:
    args = (RNG.standard_normal(x), *(RNG.standard_normal(shape) for shape in affine))
    cotangent = RNG.standard_normal(x)
    normalized = x[axis % len(x) :]
    ours = through_plan("layer_norm", args, cotangent, axis=axis, epsilon=1e-4)
    theirs = through_torch(lambda x, s, b: F.layer_norm(x, normalized, s, b, eps=1e-4), args, cotangent)
    assert_matches_torch(ours, theirs)
    bare = through_plan("layer_norm", args[:1], cotangent, axis=axis)
    assert_matches_torch(bare, through_torch(lambda x: F.layer_norm(x, normalized), args[:1], cotangent))


@pytest.mark.parametrize("x", [(2, 3, 5), (2, 2, 3, 4)])
def test_instance_norm_matches_torch(x: tuple[int, ...]) -> None:
    args = per_channel(x)
    cotangent = RNG.standard_normal(x)
    ours = through_plan("instance_norm", args, cotangent, epsilon=1e-3)
    theirs = through_torch(lambda x, s, b: F.instance_norm(x, weight=s, bias=b, eps=1e-3), args, cotangent)
    assert_matches_torch(ours, theirs)


@pytest.mark.parametrize(("x", "groups"), [((2, 6, 5), 3), ((3, 4, 2, 3), 2), ((2, 4, 3), 1), ((2, 4, 3), 4)])
def test_group_norm_matches_torch(x: tuple[int, ...], groups: int) -> None:
    args = per_channel(x)
    cotangent = RNG.standard_normal(x)
    ours = through_plan("group_norm", args, cotangent, num_groups=groups)
    theirs = through_torch(lambda x, s, b: F.group_norm(x, groups, s, b), args, cotangent)
    assert_matches_torch(ours, theirs)


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("x", [(2, 6, 4), (2, 5, 3, 2)])
def test_lrn_matches_torch(x: tuple[int, ...], size: int) -> None:
    args = (RNG.standard_normal(x) * 2,)
    cotangent = RNG.standard_normal(x)
    ours = through_plan("lrn", args, cotangent, size=size, alpha=0.4, beta=0.8, bias=1.5)
    theirs = through_torch(lambda x: F.local_response_norm(x, size, alpha=0.4, beta=0.8, k=1.5), args, cotangent)
    assert_matches_torch(ours, theirs)


@pytest.mark.parametrize(("rows", "classes", "ignore_index"), [((6,), 4, -100), ((2, 5), 3, -100), ((7,), 3, 1)])
@pytest.mark.parametrize("dtype", ["int64", "int32"])
def test_class_label_cross_entropy_matches_torch(
    rows: tuple[int, ...], classes: int, ignore_index: int, dtype: str
) -> None:
    logits, labels = class_labels(rows, classes, ignore_index, dtype)
    cotangent = np.asarray(1.7)
    ours = through_plan("softmax_cross_entropy", (logits, labels), cotangent, ignore_index=ignore_index)
    assert ours[1][1] is None

    def torch_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        flat = logits.reshape(-1, classes)
        return F.cross_entropy(flat, labels.reshape(-1).long(), ignore_index=ignore_index)

    assert_matches_torch(ours, through_torch(torch_loss, (logits, labels), cotangent))


def test_class_labels_all_ignored_give_nan_as_torch() -> None:
    logits = RNG.standard_normal((3, 4))
    labels = np.full(3, -100)
    value, _ = through_plan("softmax_cross_entropy", (logits, labels), np.asarray(1.0))
    assert np.isnan(value)
    assert torch.isnan(F.cross_entropy(torch.tensor(logits), torch.tensor(labels)))


@pytest.mark.parametrize("label", [4, -1, 99])
def test_out_of_range_class_label_is_an_invalid_argument_naming_the_node(label: int) -> None:
    nodes = [input_node("logits", "float64", (3, 4)), input_node("labels", "int64", (3,))]
    nodes.append(node("loss", "softmax_cross_entropy", "logits", "labels"))
    plan = Plan(build_graph(make_graph(nodes)))
    feeds = {"logits": RNG.standard_normal((3, 4)), "labels": np.array([0, label, 2])}
    with pytest.raises(InvalidArgument, match=f"node 'loss'.*label {label} is out of range for 4 classes") as error:
        plan.forward(feeds, {}, ["loss"])
    assert error.value.subject == "loss"


# ---------------------------------------------------------------- dropout
def dropout_plan(name: str = "drop", ratio: float = 0.5) -> Plan:
    return Plan(build_graph(make_graph([input_node("x"), node(name, "dropout", "x", ratio=ratio)])))


def test_dropout_is_the_identity_in_inference() -> None:
    x = RNG.standard_normal((4, 5))
    [out] = dropout_plan().forward({"x": x}, {}, ["drop"])
    np.testing.assert_array_equal(out, x)


@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.8])
def test_dropout_scaling_and_statistics_match_torch(ratio: float) -> None:
    """Kept elements are x / (1 - ratio) exactly as torch scales them; the kept share is 1 - ratio
    within 5 standard deviations of a binomial, for torch's masks and ours alike."""
    x = RNG.uniform(1.0, 2.0, (200, 100)).astype(np.float32)
    [out] = dropout_plan(ratio=ratio).forward({"x": x}, {}, ["drop"], mode=TRAINING)
    torch.manual_seed(0)
    theirs = F.dropout(torch.tensor(x), ratio, training=True).numpy()
    assert out.dtype == theirs.dtype == np.float32
    kept, torch_kept = out != 0, theirs != 0
    np.testing.assert_array_equal(out[kept], (torch.tensor(x[kept]) * (1 / (1 - ratio))).numpy())
    np.testing.assert_array_equal(theirs[torch_kept], (torch.tensor(x[torch_kept]) * (1 / (1 - ratio))).numpy())
    spread = 5 * np.sqrt(ratio * (1 - ratio) / x.size)
    for share in (kept.mean(), torch_kept.mean()):
        assert abs(share - (1 - ratio)) < spread
    np.testing.assert_allclose(out.mean(dtype=np.float64), x.mean(dtype=np.float64), rtol=0.05)


def test_dropout_ratio_one_gives_zeros_and_ratio_zero_the_identity() -> None:
    x = RNG.standard_normal((3, 4))
    [zeros] = dropout_plan(ratio=1.0).forward({"x": x}, {}, ["drop"], mode=TRAINING)
    np.testing.assert_array_equal(zeros, F.dropout(torch.tensor(x), 1.0, training=True).numpy())
    [same] = dropout_plan(ratio=0.0).forward({"x": x}, {}, ["drop"], mode=TRAINING)
    np.testing.assert_array_equal(same, x)


def test_dropout_masks_are_keyed_by_seed_step_and_node_name() -> None:
    x = np.ones((64, 64))

    def mask(name: str = "drop", seed: int = 0, step: int = 0) -> Array:
        [out] = dropout_plan(name).forward({"x": x}, {}, [name], mode=Mode(True, seed, step))
        return out != 0

    first = mask()
    np.testing.assert_array_equal(first, mask())  # a new plan of the same definition: the same draws
    for other in (mask(seed=1), mask(step=1), mask(name="drop2")):
        assert not np.array_equal(first, other)
    np.testing.assert_array_equal(mask(seed=2**64 - 1, step=7), mask(seed=2**64 - 1, step=7))


# ---------------------------------------------------------------- shape rules
@pytest.mark.parametrize(
    ("nodes", "message"),
    [
        (
            [input_node("x", "float64", (2, 3)), *(input_node(n, "float64", (4,)) for n in "sbmv")],
            "scale has 4 values; x has 3 channels",
        ),
        ([input_node("x", "float64", (3,)), *(input_node(n, "float64", (3,)) for n in "sbmv")], "channel axis"),
        ([input_node("x", "float64", (2, 3)), *(input_node(n, "float64", (3, 1)) for n in "sbmv")], "vector"),
    ],
)
def test_batch_norm_shape_rule_names_the_problem(nodes: list[graph_pb2.Node], message: str) -> None:
    with pytest.raises(InvalidArgument, match=f"'out'.*{message}"):
        build_graph(make_graph([*nodes, node("out", "batch_norm", "x", "s", "b", "m", "v")]))


@pytest.mark.parametrize(
    ("op", "inputs", "attrs", "message"),
    [
        ("group_norm", ((2, 6, 3), (6,), (6,)), {"num_groups": 4}, "num_groups 4 does not divide"),
        ("group_norm", ((2, 6, 3), (6,), (6,)), {"num_groups": 0}, "at least 1"),
        ("layer_norm", ((2, 3, 4), (3,)), {}, "broadcast to the normalized axes"),
        ("layer_norm", ((2, 3, 4), (2, 3, 4)), {"axis": 1}, "broadcast to the normalized axes"),
        ("layer_norm", ((2, 3), (3,)), {"axis": 2}, "axis 2 is out of range"),
        ("instance_norm", ((2, 3, 4), (2,), (3,)), {}, "scale has 2 values"),
        ("lrn", ((2, 3, 4),), {"size": 0}, "size is 0"),
        ("dropout", ((2, 3),), {"ratio": 1.5}, "between 0 and 1"),
    ],
)
def test_shape_rules_name_the_problem(
    op: str, inputs: tuple[tuple[int, ...], ...], attrs: dict[str, AttrLike], message: str
) -> None:
    names = [f"x{i}" for i in range(len(inputs))]
    declared = [input_node(name, "float64", shape) for name, shape in zip(names, inputs, strict=True)]
    with pytest.raises(InvalidArgument, match=f"'out'.*{message}"):
        build_graph(make_graph([*declared, node("out", op, *names, **attrs)]))


def test_class_labels_of_the_wrong_shape_are_refused_when_the_graph_is_built() -> None:
    nodes = [input_node("logits", "float64", (3, 4)), input_node("labels", "int64", (3, 4))]
    with pytest.raises(InvalidArgument, match=r"'loss'.*class labels have shape \[3, 4\].*need \[3\]"):
        build_graph(make_graph([*nodes, node("loss", "softmax_cross_entropy", "logits", "labels")]))


def test_lrn_window_wider_than_the_channels_sums_them_all_without_allocating_the_width() -> None:
    x = RNG.standard_normal((2, 3, 4))
    size = 2**40
    value, _ = through_plan("lrn", (x,), np.ones(x.shape), size=size, alpha=2.0**40, beta=0.5)
    expected = x / np.sqrt(1.0 + (x * x).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(value, expected, rtol=1e-12)


def test_builder_makes_the_nodes_these_ops_take() -> None:
    """Python ints given as labels stay class indices (other constants become floats); state nodes hold floats."""
    g = cr.GraphBuilder("builder", default_dtype="float32")
    x = g.input("x", "float32", [4, 3])
    mean, var = g.state("mean", [0, 0, 0]), g.state("var", np.ones(3))
    normalized = cr.batch_norm(x, np.ones(3), np.zeros(3), mean, var, momentum=0.3, name="bn")
    hidden = cr.dropout(cr.layer_norm(normalized, np.ones(3), np.zeros(3)), 0.25)
    cr.softmax_cross_entropy(hidden, [0, 2, 1, -100], name="loss")
    graph = build_graph(g.to_proto())
    nodes = {node.name: node for node in g.to_proto().nodes}
    assert tensors.decode(nodes["mean"].value).dtype == np.float32
    labels = nodes[nodes["loss"].inputs[1]]
    assert tensors.decode(labels.value).dtype == np.int64
    assert graph.nodes["loss"]["type"].dtype == np.float32
    with pytest.raises(ValueError, match="bias only with a scale"):
        cr.layer_norm(x, bias=np.zeros(3))
