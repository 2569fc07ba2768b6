"""FeedForwardExperts: the original FeedForwardExpert, all experts stacked."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_moe
from numerics import FORWARD, assert_close


def reference_expert(x, kernels, autoscale, activation=lambda h: np.maximum(h, 0)):
    """The original FeedForwardExpert.Eval in NumPy."""
    input_dim = kernels[0].shape[0]
    for layer, kernel in enumerate(kernels):
        x = x @ kernel
        if autoscale and kernel.shape[0] != input_dim:
            x = x * (kernel.shape[0] / input_dim) ** -0.5
        if layer + 1 < len(kernels):
            x = activation(x)
    return x


@pytest.mark.parametrize("autoscale", [True, False])
@pytest.mark.parametrize(
    "hidden_sizes, output_dim", [((), 5), ((7,), 4), ((7, 3), None)]
)
def test_matches_reference_per_expert(hidden_sizes, output_dim, autoscale):
    experts = keras_moe.FeedForwardExperts(
        3, output_dim, hidden_sizes=hidden_sizes, autoscale=autoscale
    )
    part_sizes = np.array([2, 0, 3], np.int32)
    x = np.random.default_rng(0).normal(size=(5, 6)).astype("float32")
    y = experts(x, part_sizes=part_sizes).numpy()
    assert y.shape == (5, output_dim or 6)
    starts = np.concatenate([[0], np.cumsum(part_sizes)])
    for i in range(3):
        rows = slice(starts[i], starts[i + 1])
        kernels = [k.numpy()[i] for k in experts.kernels]
        expected = reference_expert(x[rows], kernels, autoscale)
        assert_close(y[rows], expected, FORWARD, what=f"expert {i}")
        assert_close(experts.call_expert(x[rows], i), expected, FORWARD,
                     what=f"call_expert({i})")


def test_kernel_shapes():
    experts = keras_moe.FeedForwardExperts(4, 2, hidden_sizes=(8, 16))
    experts.build((None, 5))
    assert [tuple(k.shape) for k in experts.kernels] == [
        (4, 5, 8), (4, 8, 16), (4, 16, 2)
    ]


def test_each_expert_is_initialized_on_its_own():
    experts = keras_moe.FeedForwardExperts(8, 64)
    experts.build((None, 64))
    kernel = experts.kernels[0].numpy()
    # Glorot uniform with one expert's fans: variance 2 / (64 + 64), not
    # 2 / (8 * 128) as the stacked shape's fans would give.
    # A sample statistic of 8 * 64 * 64 draws: its tolerance is statistical
    # (a relative standard error of 0.5%), not float rounding, so it is not
    # tests/numerics.py's rule.
    np.testing.assert_allclose(kernel.var(), 2 / 128, rtol=0.1)
    assert not np.allclose(kernel[0], kernel[1])


def test_seeded_initializer_is_reproducible_and_differs_per_expert():
    def make():
        experts = keras_moe.FeedForwardExperts(
            3, 4, kernel_initializer=keras.initializers.GlorotNormal(seed=5)
        )
        experts.build((None, 4))
        return experts.kernels[0].numpy()

    first, second = make(), make()
    np.testing.assert_array_equal(first, second)
    assert not np.allclose(first[0], first[1])


def test_gradient_is_one_dense_tensor_with_zeros_for_idle_experts():
    experts = keras_moe.FeedForwardExperts(3, 2, hidden_sizes=(4,))
    x = np.ones([4, 3], np.float32)
    with tf.GradientTape() as tape:
        y = experts(x, part_sizes=np.array([1, 0, 3], np.int32))
        loss = tf.reduce_sum(y**2)
    grads = tape.gradient(loss, experts.trainable_variables)
    for grad, kernel in zip(grads, experts.kernels):
        assert isinstance(grad, tf.Tensor)  # not IndexedSlices
        assert grad.shape == kernel.shape
        np.testing.assert_array_equal(grad[1], np.zeros(grad.shape[1:]))
        assert np.abs(grad[0]).max() > 0 and np.abs(grad[2]).max() > 0


def test_compute_output_shape():
    experts = keras_moe.FeedForwardExperts(3, 7)
    assert experts.compute_output_shape((None, 5)) == (None, 7)
    assert keras_moe.FeedForwardExperts(3, None).compute_output_shape(
        (10, 5)
    ) == (10, 5)


def test_layers_of_equal_shape_draw_different_values():
    experts = keras_moe.FeedForwardExperts(
        2, 8, hidden_sizes=(8,),
        kernel_initializer=keras.initializers.RandomNormal(seed=3),
    )
    experts.build((None, 8))
    first, second = (k.numpy() for k in experts.kernels)
    assert first.shape == second.shape
    assert not np.allclose(first, second)
    assert not np.allclose(first[1], second[0])


def _built_experts():
    experts = keras_moe.FeedForwardExperts(3, 4, hidden_sizes=(5,))
    experts.build((None, 6))
    return experts


@pytest.mark.parametrize("part_sizes, error, message", [
    ([-1, 0, 3], ValueError, r"part_sizes=\[-1, 0, 3\] for 2 rows"),
    ([2, 0, 2], ValueError, "sum to the number of rows"),
    ([2, 0], ValueError, r"part_sizes.shape=\(2,\)"),
    ([[2, 0, 0]], ValueError, r"part_sizes.shape=\(1, 3\)"),
    ([2.0, 0.0, 0.0], TypeError, "part_sizes.dtype=float32"),
])
def test_bad_part_sizes(part_sizes, error, message):
    with pytest.raises(error, match=message):
        _built_experts()(np.ones((2, 6), "float32"), part_sizes=part_sizes)


def test_bad_part_sizes_inside_tf_function():
    experts = _built_experts()
    run = tf.function(
        lambda x, sizes: experts(x, part_sizes=sizes),
        input_signature=[tf.TensorSpec([None, 6]), tf.TensorSpec([None], tf.int32)],
    )
    # -1 would be tf.split's "the rest": a silent wrong split.
    with pytest.raises(tf.errors.InvalidArgumentError, match="part_sizes"):
        run(tf.ones([5, 6]), tf.constant([5, 0, -1]))
    assert run(tf.ones([5, 6]), tf.constant([5, 0, 0])).shape == (5, 4)


def test_part_sizes_as_a_list_has_a_gradient():
    experts = _built_experts()
    with tf.GradientTape() as tape:
        y = experts(np.ones((5, 6), "float32"), part_sizes=[2, 0, 3])
    grads = tape.gradient(y, experts.trainable_variables)
    assert [g.shape for g in grads] == [(3, 6, 5), (3, 5, 4)]


@pytest.mark.parametrize("jit_compile", [False, True])
def test_wrong_number_of_slabs_known_only_at_run_time(jit_compile):
    experts = _built_experts()
    run = tf.function(experts, jit_compile=jit_compile,
                      input_signature=[tf.TensorSpec([None, None, 6])])
    assert run(tf.ones([3, 2, 6])).shape == (3, 2, 4)
    # A batched matmul would broadcast one slab through every expert.
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"\[3,\?,6\]"):
        run(tf.ones([1, 2, 6]))


def test_call_expert_checks_its_input():
    with pytest.raises(ValueError, match="needs a built layer"):
        keras_moe.FeedForwardExperts(3, 4).call_expert(np.ones((2, 6)), 0)
    with pytest.raises(ValueError, match=r"x.shape=\(2, 5\)"):
        _built_experts().call_expert(np.ones((2, 5), "float32"), 0)
