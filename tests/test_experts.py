"""FeedForwardExperts: the original FeedForwardExpert, all experts stacked."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_moe
from numerics import FORWARD, GRADIENT, assert_close


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


# Gated linear unit experts (`glu=True`): the SwiGLU of Mixtral and Qwen-MoE.

def silu(v):
    return v / (1 + np.exp(-v))


def reference_glu_expert(x, gates, ups, down, autoscale):
    """A SwiGLU expert in NumPy from separate matrices: hidden layer `l` is
    `silu(a @ gates[l]) * (a @ ups[l])`, then `@ down`; with `autoscale`,
    a layer whose input size differs from the input's has its matmul
    outputs scaled by `(in / input_dim) ** -0.5`, as in the original."""
    input_dim = x.shape[1]

    def scale(a):
        return (a.shape[1] / input_dim) ** -0.5 if autoscale else 1.0

    a = x
    for gate, up in zip(gates, ups):
        s = scale(a)
        a = silu(s * (a @ gate)) * (s * (a @ up))
    return scale(a) * (a @ down)


def _glu_experts(hidden_sizes, autoscale, num_experts=3, input_dim=6,
                 output_dim=4, seed=0, **kwargs):
    """A built SwiGLU `FeedForwardExperts` holding separately drawn W_gate,
    W_up and W_down, loaded the way the docstring says (W_gate then W_up
    along the last axis); returns the layer and the matrices."""
    experts = keras_moe.FeedForwardExperts(
        num_experts, output_dim, hidden_sizes=hidden_sizes,
        hidden_activation="silu", autoscale=autoscale, glu=True, **kwargs)
    experts.build((None, input_dim))
    rng = np.random.default_rng(seed)
    sizes = (input_dim, *hidden_sizes)
    gates, ups = ([rng.normal(size=(num_experts, a, b)).astype("float32")
                   for a, b in zip(sizes[:-1], sizes[1:])] for _ in "gu")
    down = rng.normal(size=(num_experts, sizes[-1], output_dim)).astype(
        "float32")
    for kernel, gate, up in zip(experts.kernels, gates, ups):
        kernel.assign(np.concatenate([gate, up], axis=-1))
    experts.kernels[-1].assign(down)
    return experts, gates, ups, down


def _per_expert_reference(x, gates, ups, down, autoscale, expert):
    return reference_glu_expert(
        x, [g[expert] for g in gates], [u[expert] for u in ups],
        down[expert], autoscale)


@pytest.mark.parametrize("hidden_sizes, autoscale",
                         [((7,), False), ((7, 3), True)])
@pytest.mark.parametrize("path", ["part_sizes", "slabs"])
def test_glu_matches_numpy_swiglu(path, hidden_sizes, autoscale):
    experts, gates, ups, down = _glu_experts(hidden_sizes, autoscale)
    rng = np.random.default_rng(1)
    if path == "slabs":
        x = rng.normal(size=(3, 2, 6)).astype("float32")
        y = experts(x).numpy()
        parts = list(x)
        outputs = list(y)
    else:
        part_sizes = [2, 0, 3]
        x = rng.normal(size=(5, 6)).astype("float32")
        y = experts(x, part_sizes=np.array(part_sizes, np.int32)).numpy()
        parts = np.split(x, np.cumsum(part_sizes)[:-1])
        outputs = np.split(y, np.cumsum(part_sizes)[:-1])
    for i, (part, output) in enumerate(zip(parts, outputs)):
        expected = _per_expert_reference(part, gates, ups, down, autoscale,
                                         i)
        assert_close(output, expected, FORWARD, what=f"expert {i}")
        assert_close(experts.call_expert(part, i), expected, FORWARD,
                     what=f"call_expert({i})")


def _dense_glu_reference(x, kernels, part_sizes, autoscale):
    """The SwiGLU experts with plain TensorFlow ops, expert by expert, on
    the fused kernels, for autodiff (`part_sizes=None`: slabs)."""
    num_experts = kernels[0].shape[0]
    parts = (tf.unstack(x) if part_sizes is None
             else tf.split(x, part_sizes, num=num_experts))
    input_dim = x.shape[-1]
    outputs = []
    for i, a in enumerate(parts):
        for layer, kernel in enumerate(kernels):
            z = a @ kernel[i]
            if autoscale and a.shape[-1] != input_dim:
                z = z * (a.shape[-1] / input_dim) ** -0.5
            if layer + 1 < len(kernels):
                gate, up = tf.split(z, 2, axis=-1)
                z = tf.nn.silu(gate) * up
            a = z
        outputs.append(a)
    return tf.stack(outputs) if part_sizes is None else tf.concat(outputs, 0)


@pytest.mark.parametrize("path", ["part_sizes", "slabs"])
def test_glu_gradients_match_autodiff_of_a_dense_reference(path):
    experts, *_ = _glu_experts((5, 3), autoscale=True, seed=2)
    rng = np.random.default_rng(3)
    if path == "slabs":
        x = tf.constant(rng.normal(size=(3, 4, 6)), "float32")
        part_sizes = None
    else:
        x = tf.constant(rng.normal(size=(7, 6)), "float32")
        part_sizes = tf.constant([3, 0, 4])

    def values_and_gradients(fn):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = fn()
            # A non-linear loss so that dy differs per row.
            loss = tf.reduce_sum(y * tf.sin(y))
        return [y, *tape.gradient(loss, [x, *experts.kernels])]

    got = values_and_gradients(lambda: experts(x, part_sizes=part_sizes))
    want = values_and_gradients(lambda: _dense_glu_reference(
        x, [tf.convert_to_tensor(k) for k in experts.kernels], part_sizes,
        autoscale=True))
    for name, g, w in zip(["outputs", "d_x", "d_kernel_0", "d_kernel_1",
                           "d_kernel_2"], got, want):
        assert_close(g, w, FORWARD if name == "outputs" else GRADIENT,
                     what=name)
    # An expert without rows gets a zero gradient.
    if part_sizes is not None:
        for d_kernel in got[2:]:
            np.testing.assert_array_equal(d_kernel[1], 0.0)


def test_glu_kernel_shapes_and_layers():
    experts = keras_moe.FeedForwardExperts(4, 2, hidden_sizes=(8, 16),
                                           glu=True)
    experts.build((None, 5))
    # Gated layers hold W_gate and W_up side by side; W_down stays as is.
    assert [tuple(k.shape) for k in experts.kernels] == [
        (4, 5, 16), (4, 8, 32), (4, 16, 2)
    ]
    assert experts.layer_sizes == (5, 8, 16, 2)
    assert experts.compute_output_shape((None, 5)) == (None, 2)


def test_glu_halves_are_initialized_each_as_its_own_matrix():
    experts = keras_moe.FeedForwardExperts(
        8, 64, hidden_sizes=(64,), glu=True,
        kernel_initializer=keras.initializers.GlorotUniform(seed=7))
    experts.build((None, 64))
    kernel = experts.kernels[0].numpy()
    gate, up = kernel[..., :64], kernel[..., 64:]
    # Glorot uniform with one [64, 64] matrix's fans, 2 / (64 + 64), not
    # the fused [64, 128] kernel's 2 / 192 (a statistical tolerance: see
    # test_each_expert_is_initialized_on_its_own).
    np.testing.assert_allclose(gate.var(), 2 / 128, rtol=0.1)
    np.testing.assert_allclose(up.var(), 2 / 128, rtol=0.1)
    assert not np.allclose(gate, up)
    assert not np.allclose(gate[0], gate[1])
    assert not np.allclose(up[0], up[1])
    # Every gate and up slice of every expert and layer draws anew.
    slices = [gate[i] for i in range(8)] + [up[i] for i in range(8)]
    assert len({s.tobytes() for s in slices}) == 16
    again = keras_moe.FeedForwardExperts(
        8, 64, hidden_sizes=(64,), glu=True,
        kernel_initializer=keras.initializers.GlorotUniform(seed=7))
    again.build((None, 64))
    for a, b in zip(again.kernels, experts.kernels):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_glu_bad_arguments():
    with pytest.raises(ValueError,
                       match=r"Received: glu=True, hidden_sizes=\(\)"):
        keras_moe.FeedForwardExperts(3, 4, glu=True)
    with pytest.raises(ValueError,
                       match=r"Received: glu=True, hidden_sizes=None"):
        keras_moe.FeedForwardExperts(3, 4, hidden_sizes=None, glu=True)
    with pytest.raises(TypeError, match="Received: glu='yes'"):
        keras_moe.FeedForwardExperts(3, 4, hidden_sizes=(5,), glu="yes")


def test_glu_config_round_trip_and_saved_model_file(tmp_path):
    experts, *_ = _glu_experts((5,), autoscale=False)
    config = experts.get_config()
    assert config["glu"] is True
    assert keras_moe.FeedForwardExperts(3, 4).get_config()["glu"] is False
    clone = keras_moe.FeedForwardExperts.from_config(config)
    assert clone.get_config() == config
    x = np.random.default_rng(4).normal(size=(3, 2, 6)).astype("float32")
    clone.build((None, 6))
    clone.set_weights(experts.get_weights())
    np.testing.assert_array_equal(clone(x), experts(x))
    # A .keras file, in safe mode.
    model = keras.Sequential([keras.Input((2, 6)), experts])
    path = str(tmp_path / "glu.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert loaded.layers[0].glu is True
    np.testing.assert_array_equal(loaded(x), model(x))


@pytest.mark.parametrize("path", ["part_sizes", "slabs"])
def test_glu_mixed_float16(path):
    experts, gates, ups, down = _glu_experts(
        (7,), autoscale=True, dtype="mixed_float16")
    assert all(k.dtype == "float32" for k in experts.kernels)
    rng = np.random.default_rng(5)
    if path == "slabs":
        x = rng.normal(size=(3, 2, 6)).astype("float32")
        y = experts(x)
        parts, outputs = list(x), list(y.numpy())
    else:
        x = rng.normal(size=(4, 6)).astype("float32")
        y = experts(x, part_sizes=[1, 3, 0])
        parts = np.split(x, [1, 4])
        outputs = np.split(y.numpy(), [1, 4])
    assert y.dtype == tf.float16
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.cast(
            experts(x, part_sizes=None if path == "slabs" else [1, 3, 0]),
            tf.float32))
    grads = tape.gradient(loss, experts.kernels)
    assert all(g.dtype == tf.float32 and np.isfinite(g).all()
               for g in grads)
    for i, (part, output) in enumerate(zip(parts, outputs)):
        # float16 precision: 512 times float32's depth (as in
        # test_grouped_feed_forward.py).
        expected = _per_expert_reference(part, gates, ups, down, True, i)
        assert_close(output.astype("float32"), expected, FORWARD * 512,
                     what=f"expert {i}")


def test_glu_sharded_over_replicas_matches_the_replicated_layer():
    from strategies import mirrored

    def make():
        return keras_moe.FeedForwardExperts(
            4, 3, hidden_sizes=(5,), hidden_activation="silu", glu=True,
            kernel_initializer=keras.initializers.GlorotUniform(seed=2),
            expert_parallel=True)

    replicated = make()
    replicated.build((None, 6))
    strategy = mirrored(2)
    with strategy.scope():
        sharded = make()
        sharded.build((None, 6))
    assert sharded.num_shards == 2
    # Shards of [4, 6, 10]: each replica holds two experts' W_gate and W_up,
    # initialized as the replicated layer's.
    assert [tuple(s.shape) for s in sharded.kernels[0].shards] == [
        (2, 6, 10), (2, 6, 10)]
    for a, b in zip(sharded.kernels, replicated.kernels):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    rng = np.random.default_rng(6)
    slabs = [rng.normal(size=(4, 2, 6)).astype("float32") for _ in range(2)]
    values = strategy.experimental_distribute_values_from_function(
        lambda context: tf.constant(slabs[context.replica_id_in_sync_group]))
    outputs = strategy.experimental_local_results(strategy.run(
        lambda x: sharded(x, training=False), args=(values,)))
    for replica, (x, y) in enumerate(zip(slabs, outputs)):
        assert_close(y, replicated(x), FORWARD, what=f"replica {replica}")
