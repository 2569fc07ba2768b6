"""grouped_matmul against autodiff of per-group matmuls, on both ways of
computing the kernel gradient."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
import tensorflow as tf

from keras_moe import grouped_matmul as grouped_matmul_module
from keras_moe.grouped_matmul import grouped_matmul

PART_SIZES = [
    [3, 0, 5, 1],
    [0, 0, 0, 0],
    [40, 0, 0, 1],
    [1, 1, 1, 1],
    [0, 7, 0, 0],
]


def _reference(x, kernel, part_sizes):
    num_groups = kernel.shape[0]
    parts = tf.split(x, part_sizes, num=num_groups)
    return tf.concat(
        [tf.matmul(p, k) for p, k in zip(parts, tf.unstack(kernel))], 0
    )


def _values_and_gradients(fn, x, kernel, part_sizes):
    with tf.GradientTape() as tape:
        tape.watch([x, kernel])
        y = fn(x, kernel, part_sizes)
        # A non-linear loss so that dy differs per row.
        loss = tf.reduce_sum(tf.cast(y, tf.float32) * tf.sin(tf.cast(y, tf.float32)))
    return [y, *tape.gradient(loss, [x, kernel])]


def _inputs(part_sizes, dtype="float32", seed=0):
    rng = np.random.default_rng(seed)
    rows, groups = sum(part_sizes), len(part_sizes)
    x = tf.constant(rng.normal(size=(rows, 6)), dtype)
    kernel = tf.constant(rng.normal(size=(groups, 6, 5)), dtype)
    return x, kernel, tf.constant(part_sizes, tf.int32)


@pytest.mark.parametrize("part_sizes", PART_SIZES)
@pytest.mark.parametrize("max_padding", [0, 1000], ids=["stacked", "batched"])
@pytest.mark.parametrize("traced", [False, True], ids=["eager", "function"])
def test_matches_autodiff(part_sizes, max_padding, traced, monkeypatch):
    # The padding limit picks the kernel gradient's branch: 0 forces
    # per-group matmuls (except when nothing is padded), 1000 the batched
    # one.
    monkeypatch.setattr(
        grouped_matmul_module, "_MAX_PADDING_ROWS_PER_GROUP", max_padding
    )
    x, kernel, sizes = _inputs(part_sizes)
    ours, reference = grouped_matmul, _reference
    if traced:
        ours, reference = tf.function(ours), tf.function(reference)
    got = _values_and_gradients(ours, x, kernel, sizes)
    want = _values_and_gradients(reference, x, kernel, sizes)
    for name, g, w in zip(["outputs", "d_x", "d_kernel"], got, want):
        assert g.shape == w.shape, name
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=name)


def test_empty_group_gets_zero_kernel_gradient():
    x, kernel, sizes = _inputs([2, 0, 3])
    _, _, d_kernel = _values_and_gradients(grouped_matmul, x, kernel, sizes)
    assert float(tf.reduce_max(tf.abs(d_kernel[1]))) == 0.0
    assert float(tf.reduce_max(tf.abs(d_kernel[0]))) > 0.0


def test_float16():
    x, kernel, sizes = _inputs([2, 3, 0, 4], dtype="float16")
    got = _values_and_gradients(grouped_matmul, x, kernel, sizes)
    want = _values_and_gradients(
        _reference, tf.cast(x, "float32"), tf.cast(kernel, "float32"), sizes
    )
    for g, w in zip(got, want):
        assert g.dtype == tf.float16
        np.testing.assert_allclose(
            tf.cast(g, "float32"), w, rtol=2e-2, atol=2e-2
        )


def test_unknown_number_of_groups_is_an_error():
    fn = tf.function(
        grouped_matmul,
        input_signature=[
            tf.TensorSpec([None, 6]),
            tf.TensorSpec([None, 6, 5]),
            tf.TensorSpec([None], tf.int32),
        ],
    )
    with pytest.raises(ValueError, match=r"kernel.shape=\(None, 6, 5\)"):
        fn.get_concrete_function()


@pytest.mark.parametrize("capacity", [0, 1, 5])
@pytest.mark.parametrize("traced", [False, True], ids=["eager", "function"])
def test_slabs_match_autodiff(capacity, traced):
    rng = np.random.default_rng(1)
    x = tf.constant(rng.normal(size=(3, capacity, 6)), tf.float32)
    kernel = tf.constant(rng.normal(size=(3, 6, 5)), tf.float32)
    ours = lambda x, kernel, _: grouped_matmul(x, kernel)
    reference = lambda x, kernel, _: tf.matmul(x, kernel)
    if traced:
        ours, reference = tf.function(ours), tf.function(reference)
    got = _values_and_gradients(ours, x, kernel, None)
    want = _values_and_gradients(reference, x, kernel, None)
    for name, g, w in zip(["outputs", "d_x", "d_kernel"], got, want):
        assert g.shape == w.shape, name
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize(
    "x_shape, part_sizes, message",
    [
        ((4, 6), None, r"must be 3-D .*x.shape=\(4, 6\)"),
        ((2, 2, 6), [2, 2], r"must be 2-D .*x.shape=\(2, 2, 6\)"),
    ],
)
def test_layout_errors_name_the_shape(x_shape, part_sizes, message):
    kernel = tf.zeros([2, 6, 5])
    sizes = None if part_sizes is None else tf.constant(part_sizes)
    with pytest.raises(ValueError, match=message):
        grouped_matmul(tf.zeros(x_shape), kernel, sizes)
