"""NoisyTopKGating against a NumPy reference of the paper's equations."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_moe
from keras_moe.gating import top_k_by_argmax
from numerics import ELEMENTWISE, FORWARD, assert_close


def _normal_cdf(x, stddev):
    erf = np.vectorize(math.erf)
    return 0.5 * (1.0 + erf(x / (math.sqrt(2) * stddev + 1e-20)))


def reference_gating(x, w_gate, w_noise, noise, k, training, noise_epsilon):
    """Paper eqs. 3-5 and appendix A in float64 NumPy."""
    n = w_gate.shape[1]
    clean = x @ w_gate
    if w_noise is not None and training:
        stddev = np.log1p(np.exp(x @ w_noise)) + noise_epsilon
        logits = clean + noise * stddev
    else:
        stddev = np.zeros_like(clean)
        logits = clean
    order = np.argsort(-logits, axis=1, kind="stable")
    m = min(k + 1, n)
    top = np.take_along_axis(logits, order[:, :m], 1)
    exp = np.exp(top[:, :k] - top[:, :1])
    gates = np.zeros_like(logits)
    np.put_along_axis(gates, order[:, :k], exp / exp.sum(1, keepdims=True), 1)
    if w_noise is not None and k < n:
        threshold_in, threshold_out = top[:, k:k + 1], top[:, k - 1:k]
        prob = np.where(
            logits > threshold_in,
            _normal_cdf(clean - threshold_in, stddev),
            _normal_cdf(clean - threshold_out, stddev),
        )
        load = prob.sum(0)
    else:
        load = (gates > 0).sum(0).astype(np.float64)
    return gates, load


def _built_gating(d, n, k, noisy, seed=0):
    rng = np.random.default_rng(seed)
    gating = keras_moe.NoisyTopKGating(n, k=k, noisy_gating=noisy)
    gating.build((None, d))
    gating.gate_kernel.assign(rng.normal(size=(d, n)).astype("float32"))
    if noisy:
        gating.noise_kernel.assign(
            rng.normal(size=(d, n)).astype("float32") * 0.5
        )
    return gating, rng


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(
    "n, k, noisy",
    [(6, 1, True), (6, 2, True), (6, 5, True), (6, 6, True), (6, 2, False),
     (1, 1, True), (16, 12, True)],
)
def test_matches_reference(n, k, noisy, training):
    d, tokens = 5, 9
    gating, rng = _built_gating(d, n, k, noisy)
    x = rng.normal(size=(tokens, d)).astype("float32")
    noise = rng.normal(size=(tokens, n)).astype("float32")
    gates, load = gating(x, training=training, noise=noise)
    assert gates.dtype == tf.float32 and load.dtype == tf.float32
    ref_gates, ref_load = reference_gating(
        x.astype(np.float64), gating.gate_kernel.numpy(),
        gating.noise_kernel.numpy() if noisy else None,
        noise, k, training, 1e-2,
    )
    assert_close(gates, ref_gates, FORWARD, what="gates")
    # The load's scale is the token count; the float64 reference's CDFs.
    assert_close(load, ref_load, FORWARD, floor=tokens, what="load")
    nonzeros = (gates.numpy() > 0).sum(1)
    np.testing.assert_array_equal(nonzeros, np.full(tokens, min(k, n)))
    assert_close(gates.numpy().sum(1), np.ones(tokens), FORWARD,
                 what="gates' row sums")


def test_inference_load_is_the_count():
    gating, rng = _built_gating(4, 5, 2, True)
    x = rng.normal(size=(20, 4)).astype("float32")
    gates, load = gating(x, training=False)
    np.testing.assert_array_equal(load, (gates.numpy() > 0).sum(0))


def test_noise_only_when_training():
    gating, rng = _built_gating(4, 5, 2, True)
    x = rng.normal(size=(30, 4)).astype("float32")
    first, _ = gating(x, training=False)
    second, _ = gating(x, training=False)
    np.testing.assert_array_equal(first, second)
    noisy_a, _ = gating(x, training=True)
    noisy_b, _ = gating(x, training=True)
    assert not np.allclose(noisy_a, noisy_b)
    assert not np.allclose(noisy_a, first)


def test_seed_makes_noise_reproducible():
    results = []
    for _ in range(2):
        gating = keras_moe.NoisyTopKGating(
            5, k=2, seed=7, kernel_initializer="ones"
        )
        x = np.linspace(-1, 1, 12, dtype="float32").reshape(3, 4)
        results.append([gating(x, training=True)[0].numpy() for _ in range(2)])
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])


def test_zero_initialized_gate_picks_lowest_indices():
    # The original's zeros initializer makes every logit equal: ties go to
    # the lowest expert indices, each with gate 1/k.
    gating = keras_moe.NoisyTopKGating(4, k=2)
    gates, load = gating(np.ones([3, 2], "float32"), training=False)
    assert_close(gates, np.array([[0.5, 0.5, 0.0, 0.0]] * 3), ELEMENTWISE,
                 what="gates")
    # Inference load is the original's zero-noise CDF estimate: with every
    # logit tied at the threshold, each expert scores CDF(0) = 0.5 per row.
    assert_close(load, np.full(4, 1.5), ELEMENTWISE, what="load")


def test_weights():
    gating = keras_moe.NoisyTopKGating(3, k=1)
    gating.build((None, 7))
    assert gating.gate_kernel.shape == (7, 3)
    assert gating.noise_kernel.shape == (7, 3)
    assert [w.name for w in gating.trainable_weights] == [
        "gate_kernel", "noise_kernel"
    ]
    quiet = keras_moe.NoisyTopKGating(3, k=1, noisy_gating=False)
    quiet.build((None, 7))
    assert quiet.noise_kernel is None
    assert len(quiet.trainable_weights) == 1


def test_load_gradient_reaches_both_kernels_only_when_training():
    gating, rng = _built_gating(4, 6, 2, True)
    x = rng.normal(size=(16, 4)).astype("float32")
    for training in (True, False):
        with tf.GradientTape() as tape:
            _, load = gating(x, training=training)
            loss = keras_moe.cv_squared(load)
        grad_gate, grad_noise = tape.gradient(
            loss, [gating.gate_kernel, gating.noise_kernel]
        )
        if training:
            assert np.abs(grad_gate).max() > 0
            assert np.abs(grad_noise).max() > 0
        else:
            assert grad_noise is None or np.abs(grad_noise).max() == 0


@pytest.mark.parametrize("k", [1, 3, 11])
def test_top_k_by_argmax_matches_top_k(k):
    x = tf.constant(np.random.default_rng(3).normal(size=(7, 12)), tf.float32)
    values, indices = top_k_by_argmax(x, k)
    expected_values, expected_indices = tf.math.top_k(x, k)
    np.testing.assert_array_equal(values, expected_values)
    np.testing.assert_array_equal(indices, expected_indices)
    assert indices.dtype == tf.int32


def test_top_k_by_argmax_shares_gradient_of_ties_like_reduce_max():
    x = tf.constant([[1.0, 1.0, 0.0]])
    with tf.GradientTape() as tape:
        tape.watch(x)
        values, indices = top_k_by_argmax(x, 1)
    assert indices.numpy().tolist() == [[0]]
    assert_close(tape.gradient(values, x), np.array([[0.5, 0.5, 0.0]]),
                 ELEMENTWISE, what="gradient")


def test_seeded_initializer_gives_gate_and_noise_kernels_their_own_values():
    gating = keras_moe.NoisyTopKGating(
        4, kernel_initializer=keras.initializers.RandomNormal(seed=1)
    )
    gating.build((None, 3))
    assert not np.allclose(gating.gate_kernel.numpy(),
                           gating.noise_kernel.numpy())
    again = keras_moe.NoisyTopKGating(
        4, kernel_initializer=keras.initializers.RandomNormal(seed=1)
    )
    again.build((None, 3))
    np.testing.assert_array_equal(gating.noise_kernel.numpy(),
                                  again.noise_kernel.numpy())


# --------------------------------------------------------------------------
# Finite inputs too large for the kernels.
# --------------------------------------------------------------------------


def _ones_gating(noisy, k=1):
    gating = keras_moe.NoisyTopKGating(4, k=k, noisy_gating=noisy,
                                       kernel_initializer="ones")
    gating.build((None, 4))
    return gating


@pytest.mark.parametrize("noisy, training", [(False, False), (True, False),
                                             (True, True)])
def test_finite_inputs_whose_logits_overflow_are_refused(noisy, training):
    """1e38 in 4 features is finite, but its logits are not: a NaN gate
    would route the token nowhere, silently."""
    gating = _ones_gating(noisy)
    x = np.ones((3, 4), "float32")
    x[1] = 1e38
    with pytest.raises(ValueError, match=r"`inputs`.*overflow.*inputs\[1\]"):
        gating(x, training=training)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="`inputs`.*overflow"):
        tf.function(lambda x: gating(x, training=training))(tf.constant(x))
    # Masked, the token is never read.
    gates, _ = gating(x, training=training, mask=np.array([1, 0, 1], bool))
    np.testing.assert_array_equal(gates.numpy()[1], np.zeros(4))


def test_noise_that_overflows_the_noisy_logits_is_refused():
    gating = _ones_gating(True)
    x = np.ones((2, 4), "float32")
    noise = np.zeros((2, 4), "float32")
    noise[0, 2] = 3e38
    with pytest.raises(ValueError, match=r"noisy gate logits.*inputs\[0\]"):
        gating(x, training=True, noise=noise)


@pytest.mark.parametrize("scale", [1e20, -1e12])
def test_top_k_by_argmax_large_values_are_k_distinct(scale):
    """The original knocked a winner out with -1e9, which leaves a value
    above ~1e16 (or 1e9 below the others) the winner again: one expert
    chosen twice, and the thresholds of the load estimate wrong."""
    x = tf.constant([[1.0, 0.5, 0.25, 0.75]]) * scale
    values, indices = top_k_by_argmax(x, 3)
    expected_values, expected_indices = tf.math.top_k(x, 3)
    np.testing.assert_array_equal(indices, expected_indices)
    np.testing.assert_array_equal(values, expected_values)
