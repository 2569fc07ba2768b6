"""SecondaryGating: every group's noisy top-k gating from stacked kernels,
against the paper's equations group by group (a NumPy reference)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_moe.secondary_gating import SecondaryGating
from numerics import FORWARD, GRADIENT, assert_close
from test_gating import reference_gating

G, E, D = 3, 5, 4
SIZES = [4, 0, 3]  # an empty group too


def _gating(k=2, noisy=True, **kwargs):
    gating = SecondaryGating(
        G, E, k=k, noisy_gating=noisy,
        kernel_initializer=keras.initializers.RandomNormal(seed=3), **kwargs)
    gating.build((None, D))
    return gating


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("k, noisy", [(1, True), (2, True), (2, False),
                                      (E, True)])
def test_each_group_is_the_papers_gating_with_its_own_kernels(
        k, noisy, training):
    gating = _gating(k=k, noisy=noisy)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(sum(SIZES), D)).astype("float32")
    noise = rng.normal(size=(sum(SIZES), E)).astype("float32")
    gates, row_load = gating(x, group_sizes=tf.constant(SIZES),
                             training=training, noise=noise)
    w_gate = gating.gate_kernel.numpy().astype(np.float64)
    w_noise = (gating.noise_kernel.numpy().astype(np.float64)
               if noisy else None)
    start = 0
    for i, size in enumerate(SIZES):
        rows = slice(start, start + size)
        start += size
        if size == 0:
            continue
        want_gates, want_load = reference_gating(
            x[rows].astype(np.float64), w_gate[i],
            None if w_noise is None else w_noise[i], noise[rows], k,
            training, gating.noise_epsilon)
        assert_close(gates[rows], want_gates, FORWARD, what=f"group {i}")
        # The reference sums the load; the layer gives it row by row.
        assert_close(tf.reduce_sum(row_load[rows], 0), want_load, FORWARD,
                     what=f"group {i} load")


def test_gradient_reaches_only_each_rows_group():
    gating = _gating()
    x = np.random.default_rng(1).normal(
        size=(sum(SIZES), D)).astype("float32")
    with tf.GradientTape() as tape:
        gates, row_load = gating(x, group_sizes=tf.constant(SIZES),
                                 training=True)
        # Only group 2's rows.
        loss = tf.reduce_sum(gates[4:] ** 2) + tf.reduce_sum(row_load[4:])
    grad_gate, grad_noise = tape.gradient(
        loss, [gating.gate_kernel, gating.noise_kernel])
    for grad in (grad_gate, grad_noise):
        np.testing.assert_array_equal(grad.numpy()[:2], 0.0)
        assert np.abs(grad.numpy()[2]).max() > 0


def test_groups_draw_distinct_kernels_and_the_seed_repeats_the_noise():
    gating = _gating()
    kernels = gating.gate_kernel.numpy()
    assert not np.allclose(kernels[0], kernels[1])
    assert not np.allclose(gating.noise_kernel.numpy()[0], kernels[0])
    # Each group's slice is drawn as its own [d, E] variable would be.
    want = keras.initializers.RandomNormal(seed=3)((D, E)).numpy()
    assert_close(kernels[0], want, FORWARD)
    x = np.ones((7, D), "float32")
    draws = [
        _gating(seed=5)(x, group_sizes=tf.constant(SIZES), training=True)[0]
        for _ in range(2)
    ]
    np.testing.assert_array_equal(draws[0], draws[1])


def test_bad_group_sizes_are_refused():
    gating = _gating()
    x = np.ones((7, D), "float32")
    with pytest.raises(ValueError, match="group_sizes=None"):
        gating(x)
    with pytest.raises(ValueError, match=r"group_sizes=\[4, 0, 2\]"):
        gating(x, group_sizes=tf.constant([4, 0, 2]))
    with pytest.raises(ValueError, match=r"group_sizes.shape=\(2,\)"):
        gating(x, group_sizes=tf.constant([4, 3]))
    with pytest.raises(TypeError, match="group_sizes.dtype=float32"):
        gating(x, group_sizes=tf.constant([4.0, 0.0, 3.0]))
    with pytest.raises(ValueError, match="num_groups=0"):
        SecondaryGating(0, E)
    with pytest.raises(ValueError, match="k=6"):
        SecondaryGating(G, E, k=6)
