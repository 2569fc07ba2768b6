"""MixtureOfExperts: shapes, masks, routing, edge cases and the aux loss."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_moe
from keras_moe import grouped_feed_forward
from graph_size import training_step_size
from numerics import ELEMENTWISE, FORWARD, assert_close


def _layer(n=6, k=2, d=5, seed=0, **kwargs):
    layer = keras_moe.MixtureOfExperts(
        n, k=k, gate_initializer=keras.initializers.RandomNormal(seed=seed),
        **kwargs,
    )
    layer.build((None, d))
    if layer.gating.noisy_gating:
        rng = np.random.default_rng(seed)
        layer.gating.noise_kernel.assign(
            0.5 * rng.normal(size=layer.gating.noise_kernel.shape)
        )
    return layer


def _dense_reference(layer, x, gates):
    """sum_i gates[b, i] * expert_i(x[b]), every expert on every row."""
    outputs = [layer.experts.call_expert(x, i).numpy()
               for i in range(layer.num_experts)]
    return np.einsum("bi,ibo->bo", gates, np.stack(outputs))


def _assert_same_routing(y, routing, other_y, other_routing, keys):
    """The outputs and routing statistics `keys` of two calls that should
    compute the same tokens: gates' support and integer counts exactly,
    float quantities by the rule of tests/numerics.py."""
    assert_close(y, other_y, FORWARD, what="outputs")
    for key in keys:
        if np.issubdtype(np.asarray(other_routing[key]).dtype, np.integer):
            np.testing.assert_array_equal(routing[key], other_routing[key],
                                          err_msg=key)
        else:
            assert_close(routing[key], other_routing[key], FORWARD, what=key)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(12, 5), (3, 4, 5), (2, 3, 2, 5)])
def test_any_rank_equals_flattened(shape, training):
    layer = _layer(hidden_sizes=(7,), output_dim=3)
    rng = np.random.default_rng(1)
    x = rng.normal(size=shape).astype("float32")
    noise = rng.normal(size=shape[:-1] + (6,)).astype("float32")
    y, routing = layer(x, training=training, noise=noise, return_routing=True)
    flat_y, flat_routing = layer(
        x.reshape(-1, 5), training=training, noise=noise.reshape(-1, 6),
        return_routing=True,
    )
    assert y.shape == shape[:-1] + (3,)
    assert routing["gates"].shape == shape[:-1] + (6,)
    _assert_same_routing(y.numpy().reshape(-1, 3), routing, flat_y,
                         flat_routing, ("importance", "load", "aux_loss"))
    gates = flat_routing["gates"].numpy()
    assert_close(flat_y, _dense_reference(layer, x.reshape(-1, 5), gates),
                 FORWARD)


@pytest.mark.parametrize("training", [True, False])
def test_mask_equals_unmasked_rows_only(training):
    layer = _layer(hidden_sizes=(4,))
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 7, 5)).astype("float32")
    noise = rng.normal(size=(3, 7, 6)).astype("float32")
    mask = rng.random((3, 7)) > 0.4
    x[~mask] = np.nan  # masked positions are never read
    y, routing = layer(x, training=training, mask=mask, noise=noise,
                       return_routing=True)
    kept_y, kept = layer(x[mask], training=training, noise=noise[mask],
                         return_routing=True)
    np.testing.assert_array_equal(y.numpy()[~mask], 0.0)
    np.testing.assert_array_equal(routing["gates"].numpy()[~mask], 0.0)
    masked_routing = dict(routing, gates=routing["gates"].numpy()[mask])
    _assert_same_routing(y.numpy()[mask], masked_routing, kept_y, kept,
                         ("gates", "importance", "load", "aux_loss",
                          "part_sizes"))
    assert int(routing["part_sizes"].numpy().sum()) == 2 * mask.sum()


def test_mask_equivalence_catches_the_smallest_defects():
    # The comparison above, under the same tolerance, still fails on the
    # smallest defects that matter (tests/numerics.py).
    layer = _layer(hidden_sizes=(4,))
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 7, 5)).astype("float32")
    mask = rng.random((3, 7)) > 0.4
    keys = ("gates", "importance", "load", "aux_loss", "part_sizes")
    y, routing = layer(x, mask=mask, return_routing=True)
    masked_routing = dict(routing, gates=routing["gates"].numpy()[mask])
    kept_y, kept = layer(x[mask], return_routing=True)
    _assert_same_routing(y.numpy()[mask], masked_routing, kept_y, kept, keys)
    # One expert's kernel off by 1e-3, relative.
    busiest = int(np.argmax(kept["part_sizes"]))
    kernel = layer.experts.kernels[0]
    original = kernel.numpy()
    kernel.assign(original * np.where(
        np.arange(layer.num_experts)[:, None, None] == busiest, 1 + 1e-3, 1)
        .astype("float32"))
    off_y, off = layer(x[mask], return_routing=True)
    kernel.assign(original)
    with pytest.raises(AssertionError, match="outputs"):
        _assert_same_routing(y.numpy()[mask], masked_routing, off_y, off,
                             keys)
    # One token routed to the wrong expert: its gates moved to an expert it
    # did not choose.
    gates = kept["gates"].numpy()
    wrong = gates.copy()
    wrong[0] = np.roll(wrong[0], 1)
    assert (wrong[0] != 0).tolist() != (gates[0] != 0).tolist()
    wrong_y = _dense_reference(layer, x[mask], wrong)
    with pytest.raises(AssertionError):
        _assert_same_routing(y.numpy()[mask], masked_routing, wrong_y,
                             dict(kept, gates=wrong), keys)


def test_mask_from_embedding_propagates():
    inputs = keras.Input((None,), dtype="int32")
    h = keras.layers.Embedding(10, 4, mask_zero=True)(inputs)
    moe = keras_moe.MixtureOfExperts(3, k=1)
    y = moe(h)
    model = keras.Model(inputs, y)
    out = model(np.array([[1, 2, 0, 0], [3, 0, 0, 0]]))
    assert out.shape == (2, 4, 4)
    np.testing.assert_array_equal(out.numpy()[0, 2:], 0.0)
    np.testing.assert_array_equal(out.numpy()[1, 1:], 0.0)
    assert np.abs(out.numpy()[0, :2]).sum() > 0
    assert y._keras_mask is not None


def _hierarchical(**kwargs):
    return keras_moe.HierarchicalMixtureOfExperts(
        2, 3, k=1, group_k=2, gate_initializer="random_normal", **kwargs
    )


@pytest.mark.parametrize("make_layer", [
    lambda: keras_moe.MixtureOfExperts(
        4, k=2, gate_initializer="random_normal"),
    lambda: keras_moe.MixtureOfExperts(
        4, k=2, gate_initializer="random_normal", dispatch="capacity"),
    _hierarchical,
], ids=["sparse", "capacity", "hierarchical"])
@pytest.mark.parametrize("side_input", ["gating_inputs", "gate_multiplier"])
def test_mask_from_embedding_with_another_tensor_argument(make_layer,
                                                          side_input):
    # With a second tensor argument Keras passes the mask as `inputs_mask`.
    ids = np.array([[5, 6, 0, 0], [1, 2, 3, 0]])
    inputs = keras.Input((None,), dtype="int32")
    h = keras.layers.Embedding(10, 4, mask_zero=True)(inputs)
    side = (keras.layers.Dense(4)(h) if side_input == "gating_inputs"
            else keras.layers.Dense(1, activation="sigmoid")(h)[..., 0])
    layer = make_layer()
    y, routing = layer(h, return_routing=True, **{side_input: side})
    model = keras.Model(inputs, [y, routing["part_sizes"], h, side])
    out, part_sizes, h_value, side_value = model(ids)
    mask = ids > 0
    np.testing.assert_array_equal(out.numpy()[~mask], 0.0)
    assert np.abs(out.numpy()[mask]).sum() > 0
    # The same as passing the mask by hand.
    explicit = layer(h_value, mask=mask, **{side_input: side_value})
    assert_close(out, explicit, FORWARD)
    if not isinstance(layer, keras_moe.HierarchicalMixtureOfExperts):
        assert int(part_sizes.numpy().sum()) == 2 * mask.sum()


def test_gate_multiplier_scales_gates_and_zero_skips_the_token():
    layer = _layer(noisy_gating=False)
    x = np.random.default_rng(3).normal(size=(4, 5)).astype("float32")
    multiplier = np.array([1.0, 0.5, 0.0, 2.0], np.float32)
    y, routing = layer(x, gate_multiplier=multiplier, return_routing=True)
    plain_y, plain = layer(x, return_routing=True)
    assert_close(routing["gates"], plain["gates"].numpy() * multiplier[:, None],
                 ELEMENTWISE)
    assert_close(y, plain_y.numpy() * multiplier[:, None], FORWARD)
    assert_close(routing["importance"], routing["gates"].numpy().sum(0),
                 ELEMENTWISE)
    assert int(routing["part_sizes"].numpy().sum()) == 3 * 2


def test_gating_inputs_feed_the_gate_and_inputs_feed_the_experts():
    layer = keras_moe.MixtureOfExperts(
        4, k=2, noisy_gating=False, gate_initializer="random_normal"
    )
    rng = np.random.default_rng(4)
    x = rng.normal(size=(6, 5)).astype("float32")
    gate_x = rng.normal(size=(6, 3)).astype("float32")
    y, routing = layer(x, gating_inputs=gate_x, return_routing=True)
    assert layer.gating.gate_kernel.shape == (3, 4)
    gates, _ = layer.gating(gate_x)
    assert_close(routing["gates"], gates, ELEMENTWISE)
    assert_close(y, _dense_reference(layer, x, gates.numpy()), FORWARD)


@pytest.mark.parametrize("loss_coef", [0.0, 0.1])
def test_aux_loss_is_added_once_with_the_papers_formula(loss_coef):
    layer = _layer(loss_coef=loss_coef)
    x = np.random.default_rng(5).normal(size=(10, 5)).astype("float32")
    _, routing = layer(x, training=True, return_routing=True)
    expected = loss_coef * (
        keras_moe.cv_squared(routing["importance"])
        + keras_moe.cv_squared(routing["load"])
    )
    assert len(layer.losses) == 1
    assert layer.losses[0].dtype == tf.float32
    assert_close(layer.losses[0], expected, FORWARD)
    assert_close(routing["aux_loss"], expected, FORWARD)


def test_empty_batch():
    layer = _layer(output_dim=3)
    y, routing = layer(np.zeros([0, 5], "float32"), training=True,
                       return_routing=True)
    assert y.shape == (0, 3)
    assert np.isfinite(float(routing["aux_loss"]))
    np.testing.assert_array_equal(routing["load"], np.zeros(6))
    assert layer(np.zeros([2, 0, 5], "float32")).shape == (2, 0, 3)


def test_every_token_to_one_expert_and_idle_experts():
    layer = keras_moe.MixtureOfExperts(4, k=1, noisy_gating=False)
    layer.build((None, 3))
    kernel = np.zeros((3, 4), np.float32)
    kernel[:, 2] = 1.0  # expert 2 wins for positive inputs
    layer.gating.gate_kernel.assign(kernel)
    x = np.abs(np.random.default_rng(6).normal(size=(8, 3))).astype("float32")
    y, routing = layer(x, return_routing=True)
    assert routing["part_sizes"].numpy().tolist() == [0, 0, 8, 0]
    np.testing.assert_array_equal(routing["load"], [0, 0, 8, 0])
    # CV^2 of one-hot of 4 is n - 1 = 3 for both importance and load.
    assert_close(routing["aux_loss"], np.float32(1e-2 * (3 + 3)), FORWARD)
    assert_close(y, layer.experts.call_expert(x, 2), FORWARD)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(x))
    grads = tape.gradient(loss, layer.experts.kernels)
    assert all(np.isfinite(g).all() for g in grads)
    np.testing.assert_array_equal(grads[0][0], 0.0)


def test_single_expert():
    layer = keras_moe.MixtureOfExperts(1, k=1, hidden_sizes=(3,))
    x = np.random.default_rng(7).normal(size=(5, 4)).astype("float32")
    y, routing = layer(x, training=True, return_routing=True)
    assert_close(y, layer.experts.call_expert(x, 0), FORWARD)
    np.testing.assert_array_equal(routing["gates"], np.ones((5, 1)))
    np.testing.assert_array_equal(routing["load"], [5.0])
    assert float(routing["aux_loss"]) == 0.0


def test_inference_is_deterministic_and_training_is_noisy():
    layer = _layer(n=8, k=2)
    x = np.random.default_rng(8).normal(size=(64, 5)).astype("float32")
    np.testing.assert_array_equal(layer(x), layer(x))
    assert not np.allclose(layer(x, training=True), layer(x, training=True))


@pytest.mark.parametrize("dispatch", ["sparse", "capacity"])
def test_graph_size_does_not_grow_with_the_number_of_experts(dispatch):
    # Past grouped_feed_forward.MAX_UNROLLED_EXPERTS experts the per-expert
    # matmuls run in graph loops: the same training step for any number.
    def train_step_size(num_experts):
        layer = keras_moe.MixtureOfExperts(
            num_experts, k=2, hidden_sizes=(4,), dispatch=dispatch)
        layer.build((None, 5))
        return training_step_size(layer, 5)

    step = grouped_feed_forward.EXPERTS_PER_STEP
    first = grouped_feed_forward.MAX_UNROLLED_EXPERTS + step
    sizes = [train_step_size(first), train_step_size(first + 60 * step)]
    assert sizes[0] == sizes[1], sizes
