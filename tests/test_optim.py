"""chainrule.server.optim against PyTorch's SGD and Adam formulas, written out by hand below.

The references are deliberately written in the textbook form (torch's documentation) rather
than mirroring the implementation, so a transcription slip in either shows up as a mismatch.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

from chainrule.server.optim import Adam, Optimizer, Sgd, State, apply, state_keys, step, validate

STEPS = 5
SHAPE = (3, 4)


def make_param(dtype: type = np.float64) -> np.ndarray:
    return np.random.default_rng(0).normal(size=SHAPE).astype(dtype)


def make_grads(dtype: type = np.float64) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.normal(size=SHAPE).astype(dtype) for _ in range(STEPS)]


def run(optimizer: Optimizer, param: np.ndarray, grads: list[np.ndarray]) -> tuple[list[np.ndarray], State]:
    """Apply `step` the way the service does: new = param + update, state threaded through."""
    state: State = {}
    trajectory = []
    for grad in grads:
        update, state = step(optimizer, param, grad, state)
        param = param + update
        trajectory.append(param)
    return trajectory, state


def reference_sgd(
    param: np.ndarray,
    grads: list[np.ndarray],
    lr: float,
    momentum: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
) -> tuple[list[np.ndarray], np.ndarray | None]:
    """torch.optim.SGD, dampening 0: g += wd*theta; b_1 = g_1, b_t = mu*b_{t-1} + g_t; nesterov steps on g + mu*b."""
    trajectory = []
    buffer = None
    for grad in grads:
        g = grad + weight_decay * param
        if momentum != 0:
            buffer = g if buffer is None else momentum * buffer + g
            g = g + momentum * buffer if nesterov else buffer
        param = param - lr * g
        trajectory.append(param)
    return trajectory, buffer


def reference_adam(
    param: np.ndarray,
    grads: list[np.ndarray],
    lr: float = 1e-3,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """torch.optim.Adam (amsgrad off): theta_t = theta_{t-1} - lr * m_hat / (sqrt(v_hat) + eps)."""
    trajectory = []
    m = np.zeros_like(param)
    v = np.zeros_like(param)
    for t, grad in enumerate(grads, start=1):
        g = grad + weight_decay * param
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g**2
        m_hat = m / (1 - beta1**t)
        v_hat = v / (1 - beta2**t)
        param = param - lr * m_hat / (np.sqrt(v_hat) + eps)
        trajectory.append(param)
    return trajectory, m, v


SGD_CASES = {
    "plain": Sgd(learning_rate=0.1),
    "momentum": Sgd(learning_rate=0.1, momentum=0.9),
    "nesterov": Sgd(learning_rate=0.05, momentum=0.8, nesterov=True),
    "weight_decay": Sgd(learning_rate=0.1, weight_decay=0.01),
    "weight_decay_momentum": Sgd(learning_rate=0.1, momentum=0.9, weight_decay=0.01),
    "weight_decay_nesterov": Sgd(learning_rate=0.1, momentum=0.9, nesterov=True, weight_decay=0.05),
}

ADAM_CASES = {
    "defaults": Adam(),
    "large_lr_custom_betas": Adam(learning_rate=0.1, beta1=0.5, beta2=0.9, epsilon=1e-6),
    "weight_decay": Adam(learning_rate=0.01, weight_decay=0.1),
}

ALL_CASES = {f"sgd_{name}": opt for name, opt in SGD_CASES.items()} | {
    f"adam_{name}": opt for name, opt in ADAM_CASES.items()
}


@pytest.mark.parametrize("sgd", SGD_CASES.values(), ids=SGD_CASES.keys())
def test_sgd_matches_torch_formulas(sgd: Sgd) -> None:
    param, grads = make_param(), make_grads()
    trajectory, state = run(sgd, param, grads)
    expected, buffer = reference_sgd(param, grads, sgd.learning_rate, sgd.momentum, sgd.nesterov, sgd.weight_decay)
    for got, want in zip(trajectory, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12)
    if buffer is None:
        assert state == {}
    else:
        np.testing.assert_allclose(state["momentum_buffer"], buffer, rtol=1e-12)


@pytest.mark.parametrize("adam", ADAM_CASES.values(), ids=ADAM_CASES.keys())
def test_adam_matches_torch_formulas(adam: Adam) -> None:
    param, grads = make_param(), make_grads()
    trajectory, state = run(adam, param, grads)
    expected, m, v = reference_adam(
        param, grads, adam.learning_rate, adam.beta1, adam.beta2, adam.epsilon, adam.weight_decay
    )
    for got, want in zip(trajectory, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12)
    np.testing.assert_allclose(state["exp_avg"], m, rtol=1e-12)
    np.testing.assert_allclose(state["exp_avg_sq"], v, rtol=1e-12)
    assert state["step"].dtype == np.int64
    assert state["step"].shape == ()
    assert int(state["step"]) == STEPS


def test_plain_sgd_update_is_exactly_minus_lr_times_grad() -> None:
    sgd = Sgd(learning_rate=0.3)
    param, grad = make_param(), make_grads()[0]
    update, state = step(sgd, param, grad, {})
    np.testing.assert_array_equal(update, -0.3 * grad)
    assert state == {}


def test_first_momentum_step_starts_the_buffer_at_the_gradient() -> None:
    update, state = step(Sgd(learning_rate=0.1, momentum=0.9), make_param(), make_grads()[0], {})
    np.testing.assert_array_equal(state["momentum_buffer"], make_grads()[0])
    np.testing.assert_array_equal(update, -0.1 * make_grads()[0])


def test_first_adam_step_moves_each_entry_by_about_the_learning_rate() -> None:
    # Bias correction makes m_hat = g and sqrt(v_hat) = |g| on the first step.
    grad = make_grads()[0]
    update, _ = step(Adam(learning_rate=0.01), make_param(), grad, {})
    np.testing.assert_allclose(update, -0.01 * np.sign(grad), rtol=1e-6)


@pytest.mark.parametrize("optimizer", ALL_CASES.values(), ids=ALL_CASES.keys())
def test_state_holds_exactly_the_declared_keys(optimizer: Optimizer) -> None:
    _, state = run(optimizer, make_param(), make_grads())
    assert set(state) == set(state_keys(optimizer))


@pytest.mark.parametrize("optimizer", ALL_CASES.values(), ids=ALL_CASES.keys())
def test_step_mutates_nothing_and_shares_no_memory(optimizer: Optimizer) -> None:
    param, grads = make_param(), make_grads()
    _, state = run(optimizer, param, grads[:2])
    fresh: State = {}
    for state_before in (fresh, state):
        param_before, grad_before, state_copy = param.copy(), grads[2].copy(), copy.deepcopy(state_before)
        update, new_state = step(optimizer, param, grads[2], state_before)
        np.testing.assert_array_equal(param, param_before)
        np.testing.assert_array_equal(grads[2], grad_before)
        assert state_before.keys() == state_copy.keys()
        for key, value in state_before.items():
            np.testing.assert_array_equal(value, state_copy[key])
        assert new_state is not state_before
        inputs = [param, grads[2], *state_before.values()]
        for output in [update, *new_state.values()]:
            assert not any(np.shares_memory(output, array) for array in inputs)


@pytest.mark.parametrize("optimizer", ALL_CASES.values(), ids=ALL_CASES.keys())
def test_float32_parameters_keep_float32_updates_and_state(optimizer: Optimizer) -> None:
    param32, grads32 = make_param(np.float32), make_grads(np.float32)
    state: State = {}
    param = param32
    for grad in grads32:
        update, state = step(optimizer, param, grad, state)
        assert update.dtype == np.float32
        param = param + update
    assert param.dtype == np.float32
    for key, value in state.items():
        assert value.dtype == (np.int64 if key == "step" else np.float32), key
    trajectory64, _ = run(optimizer, param32.astype(np.float64), [g.astype(np.float64) for g in grads32])
    np.testing.assert_allclose(param, trajectory64[-1], rtol=1e-4, atol=1e-6)


def test_gradient_is_cast_to_the_parameter_dtype() -> None:
    update, state = step(Sgd(learning_rate=0.1, momentum=0.9), make_param(np.float32), make_grads()[0], {})
    assert update.dtype == np.float32
    assert state["momentum_buffer"].dtype == np.float32


@pytest.mark.parametrize(
    ("optimizer", "field"),
    [
        (Sgd(learning_rate=0.0), "learning_rate"),
        (Sgd(learning_rate=-0.1), "learning_rate"),
        (Sgd(learning_rate=math.nan), "learning_rate"),
        (Adam(learning_rate=math.inf), "learning_rate"),
        (Sgd(learning_rate=0.1, momentum=-0.5), "momentum"),
        (Sgd(learning_rate=0.1, momentum=math.nan), "momentum"),
        (Sgd(learning_rate=0.1, nesterov=True), "nesterov"),
        (Sgd(learning_rate=0.1, weight_decay=-1e-4), "weight_decay"),
        (Adam(weight_decay=-1e-4), "weight_decay"),
        (Adam(beta1=1.0), "beta1"),
        (Adam(beta1=-0.1), "beta1"),
        (Adam(beta2=1.0), "beta2"),
        (Adam(beta2=math.nan), "beta2"),
        (Adam(epsilon=0.0), "epsilon"),
        (Adam(epsilon=math.inf), "epsilon"),
    ],
)
def test_validate_rejects_bad_hyperparameters_naming_the_field(optimizer: Optimizer, field: str) -> None:
    with pytest.raises(ValueError, match=rf"\.{field}\b"):
        validate(optimizer)


@pytest.mark.parametrize("optimizer", ALL_CASES.values(), ids=ALL_CASES.keys())
def test_validate_accepts_the_cases_under_test(optimizer: Optimizer) -> None:
    validate(optimizer)


def test_validate_accepts_zero_betas() -> None:
    validate(Adam(beta1=0.0, beta2=0.0))


def test_step_rejects_a_gradient_of_another_shape() -> None:
    with pytest.raises(ValueError, match="shape"):
        step(Sgd(learning_rate=0.1), np.zeros((2, 3)), np.zeros((3, 2)), {})


def test_step_rejects_state_of_another_optimizer() -> None:
    _, sgd_state = step(Sgd(learning_rate=0.1, momentum=0.9), make_param(), make_grads()[0], {})
    with pytest.raises(ValueError, match="state"):
        step(Adam(), make_param(), make_grads()[1], sgd_state)


def test_step_rejects_integer_parameters() -> None:
    with pytest.raises(ValueError, match="floating"):
        step(Sgd(learning_rate=0.1), np.zeros(3, dtype=np.int64), np.zeros(3, dtype=np.int64), {})


def test_apply_adds_the_update_bit_for_bit_whether_or_not_the_update_is_kept() -> None:
    rng = np.random.default_rng(5)
    param = rng.normal(size=(4, 3)).astype(np.float32)
    update, _ = step(Sgd(0.1, momentum=0.9), param, rng.normal(size=(4, 3)), {})
    expected = param + update
    before = param.copy()
    kept = apply(param, update, keep_update=True)
    assert kept.tobytes() == expected.tobytes() and kept is not update
    reused = apply(param, update, keep_update=False)
    assert reused.tobytes() == expected.tobytes() and reused is update
    assert param.tobytes() == before.tobytes()


@pytest.mark.parametrize("optimizer", ALL_CASES.values(), ids=ALL_CASES.keys())
@pytest.mark.parametrize("keep_update", [True, False])
def test_a_0d_parameter_takes_steps_and_stays_an_array(optimizer: Optimizer, keep_update: bool) -> None:
    """A scalar parameter's gradient and update come out of numpy as scalars, not 0-d arrays."""
    param, state = np.array(0.5, dtype=np.float32), {}
    for grad in (np.float32(0.25), np.float64(-1.0), np.array(2.0)):
        update, state = step(optimizer, param, grad, state)  # type: ignore[arg-type]
        expected = param + update
        param = apply(param, update, keep_update=keep_update)
        assert isinstance(param, np.ndarray) and param.shape == () and param.dtype == np.float32
        assert param.tobytes() == np.asarray(expected).tobytes()
