"""The statistics of keras_moe/balance.py: cv_squared, max_overload,
gates_to_load, switch_loss and router_z_loss against hand-computed values (cv_squared also against the
NumPy reference of tests/balance_reference.py, which the hand-computed
values check too). The balancing loss of the MoE layers built from them is
tested in test_balancing.py."""

import numpy as np
import pytest
import tensorflow as tf

import balance_reference as reference
import keras_moe
from numerics import ELEMENTWISE, FORWARD, assert_close


@pytest.mark.parametrize(
    "cv_squared",
    [keras_moe.cv_squared, reference.cv_squared],
    ids=["keras_moe", "numpy_reference"],
)
@pytest.mark.parametrize(
    "values, expected",
    [
        ([1.0, 1.0, 1.0, 1.0], 0.0),
        # Everything on one of n experts: CV^2 = n - 1.
        ([4.0, 0.0, 0.0, 0.0], 3.0),
        ([8.0, 0.0], 1.0),
        # Population variance of (1, 3) is 1, mean 2: 1 / 4.
        ([1.0, 3.0], 0.25),
        ([], 0.0),
        ([0.0, 0.0, 0.0], 0.0),
    ],
)
def test_cv_squared_hand_computed(cv_squared, values, expected):
    # CV^2 is computed from x / mean, of order 1: that is the floor for the
    # references that are zero.
    assert_close(cv_squared(tf.constant(values, tf.float32)), expected,
                 ELEMENTWISE, floor=1.0, what=f"cv_squared{values}")


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4)])
def test_cv_squared_matches_formula_for_any_shape(shape):
    x = np.random.default_rng(0).gamma(2.0, size=shape).astype("float32")
    result = keras_moe.cv_squared(x)
    assert result.dtype == tf.float32
    # Two reductions and a division, in float32 against float64.
    assert_close(result, reference.cv_squared(x), FORWARD,
                 what=f"cv_squared of shape {shape}")


def test_cv_squared_accepts_integer_counts():
    assert_close(keras_moe.cv_squared([2, 0]), 1.0, ELEMENTWISE,
                 what="cv_squared([2, 0])")


def test_cv_squared_rejects_strings():
    with pytest.raises(TypeError, match="x.dtype=string"):
        keras_moe.cv_squared(tf.constant(["a", "b"]))


@pytest.mark.parametrize(
    "load, expected",
    [
        ([2.0, 2.0, 2.0, 2.0], 1.0),
        ([4.0, 0.0, 0.0, 0.0], 4.0),
        ([3.0, 1.0], 1.5),
        # 2-D: rows are devices, summed over experts: (4, 0) -> max/mean = 2.
        ([[3.0, 1.0], [0.0, 0.0]], 2.0),
        ([[1.0, 1.0, 1.0], [2.0, 0.0, 1.0], [0.0, 0.0, 3.0]], 1.0),
    ],
)
def test_max_overload_hand_computed(load, expected):
    assert_close(keras_moe.max_overload(load), expected, ELEMENTWISE,
                 what=f"max_overload({load})")


def test_max_overload_rejects_scalars():
    with pytest.raises(ValueError, match="load.shape=()"):
        keras_moe.max_overload(3.0)


def test_gates_to_load_counts_positive_gates():
    gates = [[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.0, 0.2, 0.8]]
    load = keras_moe.gates_to_load(gates)
    assert load.dtype == tf.float32
    assert load.numpy().tolist() == [2.0, 2.0, 1.0]


def test_gates_to_load_of_empty_batch_is_zero():
    load = keras_moe.gates_to_load(tf.zeros([0, 4]))
    assert load.numpy().tolist() == [0.0] * 4


def test_gates_to_load_rejects_wrong_rank():
    with pytest.raises(ValueError, match=r"gates.shape=\(3,\)"):
        keras_moe.gates_to_load([0.1, 0.2, 0.3])


@pytest.mark.parametrize(
    "load, mean_probability, expected",
    [
        # Uniform routing and probabilities: 1 whatever E.
        ([3.0, 3.0, 3.0], [1 / 3, 1 / 3, 1 / 3], 1.0),
        # Everything on one expert, which has all the probability: E.
        ([6.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], 4.0),
        # Only the fractions count: f = (0.75, 0.25), P = (0.5, 0.5):
        # 2 * (0.375 + 0.125).
        ([6.0, 2.0], [0.5, 0.5], 1.0),
        # f = (0.75, 0.25), P = (0.9, 0.1): 2 * (0.675 + 0.025).
        ([3, 1], [0.9, 0.1], 1.4),
        # Nothing routed.
        ([0.0, 0.0], [0.0, 0.0], 0.0),
    ],
)
def test_switch_loss_hand_computed(load, mean_probability, expected):
    assert_close(keras_moe.switch_loss(load, mean_probability), expected,
                 FORWARD, floor=1.0, what=f"switch_loss{load}")


def test_switch_loss_gradient_flows_through_the_probabilities_only():
    load = tf.Variable([3.0, 1.0])
    probability = tf.Variable([0.9, 0.1])
    with tf.GradientTape() as tape:
        loss = keras_moe.switch_loss(load, probability)
    load_gradient, probability_gradient = tape.gradient(
        loss, [load, probability])
    assert load_gradient is None
    # d/dP_i of E * sum f_i P_i is E * f_i.
    assert_close(probability_gradient, [1.5, 0.5], ELEMENTWISE)


@pytest.mark.parametrize(
    "logits, expected",
    [
        # One token, E equal logits: log(E)^2.
        ([[0.0, 0.0, 0.0, 0.0]], np.log(4.0) ** 2),
        # logsumexp(log 1, log 3) = log 4; logsumexp(0, 0) = log 2.
        ([[0.0, np.log(3.0)], [0.0, 0.0]],
         (np.log(4.0) ** 2 + np.log(2.0) ** 2) / 2),
        # Large logits do not overflow: logsumexp(100, 100) = 100 + log 2.
        ([[100.0, 100.0]], (100 + np.log(2.0)) ** 2),
    ],
)
def test_router_z_loss_hand_computed(logits, expected):
    assert_close(keras_moe.router_z_loss(tf.constant(logits, tf.float32)),
                 expected, FORWARD, what=f"router_z_loss{logits}")


def test_router_z_loss_of_no_tokens_is_zero():
    assert float(keras_moe.router_z_loss(tf.zeros([0, 3]))) == 0.0


@pytest.mark.parametrize("call, match", [
    (lambda: keras_moe.switch_loss([[1.0]], [1.0]), r"load.shape=\(1, 1\)"),
    (lambda: keras_moe.switch_loss([1.0], 1.0), r"mean_probability.shape=\(\)"),
    (lambda: keras_moe.router_z_loss([1.0, 2.0]), r"logits.shape=\(2,\)"),
])
def test_losses_reject_wrong_ranks(call, match):
    with pytest.raises(ValueError, match=match):
        call()
