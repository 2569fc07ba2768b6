"""The capacity dispatch: static shapes, XLA, exact drop accounting, and
equality with the sparse dispatch when nothing is dropped."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_moe
from keras_moe import grouped_feed_forward
from keras_moe.dispatch import CapacityDispatcher
from numerics import ELEMENTWISE, FORWARD, GRADIENT, assert_close


def test_hand_built_routing_drops_in_token_order():
    # Expert 0 is wanted by rows 0, 1, 2 (capacity 2: row 2 is dropped
    # there), expert 1 by rows 0 and 3, expert 2 by nobody.
    gates = tf.constant(
        [[0.6, 0.4, 0.0], [1.0, 0.0, 0.0], [0.7, 0.0, 0.3], [0.0, 1.0, 0.0]]
    )
    dispatcher = CapacityDispatcher(3, gates, k=2, capacity=2)
    inputs = tf.constant([[1.0], [2.0], [3.0], [4.0]])
    slabs = dispatcher.dispatch(inputs)[:, :, 0].numpy()
    np.testing.assert_array_equal(slabs, [[1, 2], [1, 4], [3, 0]])
    assert dispatcher.part_sizes.numpy().tolist() == [2, 2, 1]
    # 6 choices, 1 dropped (row 2 at expert 0).
    assert_close(dispatcher.dropped_fraction, 1 / 6, ELEMENTWISE,
                 what="dropped_fraction")
    experts, rows, pair_gates = dispatcher.routed_pairs()
    assert experts.numpy().tolist() == [0, 0, 1, 1, 2]
    assert rows.numpy().tolist() == [0, 1, 0, 3, 2]
    # The gates themselves, gathered.
    np.testing.assert_array_equal(
        pair_gates, np.float32([0.6, 1.0, 0.4, 1.0, 0.3]))
    # Expert e multiplies by (e + 1): row 2 keeps only expert 2's share.
    combined = dispatcher.combine(
        dispatcher.dispatch(inputs) * tf.constant([1.0, 2.0, 3.0])[:, None,
                                                                  None]
    )
    assert_close(combined[:, 0],
                 np.array([0.6 * 1 + 0.4 * 2, 2.0, 0.3 * 3 * 3, 2 * 4.0]),
                 ELEMENTWISE, what="combined")


def test_only_the_k_chosen_experts_queue():
    # Row 0 has two positive gates but k=1: only its larger one (expert 0)
    # is used; its 0.4 for expert 1 must not take expert 1's only slot.
    gates = tf.constant([[0.6, 0.4], [0.0, 1.0], [1.0, 0.0]])
    dispatcher = CapacityDispatcher(2, gates, k=1, capacity=1)
    inputs = tf.constant([[1.0], [2.0], [3.0]])
    np.testing.assert_array_equal(
        dispatcher.dispatch(inputs)[:, :, 0], [[1.0], [2.0]]
    )
    assert_close(dispatcher.dropped_fraction, 1 / 3, ELEMENTWISE,
                 what="dropped_fraction")
    # With room for all, the same as the sparse dispatch of the top-1 gates.
    roomy = CapacityDispatcher(2, gates, k=1, capacity=3)
    sparse = keras_moe.SparseDispatcher(
        2, tf.constant([[0.6, 0.0], [0.0, 1.0], [1.0, 0.0]])
    )
    assert_close(roomy.combine(roomy.dispatch(inputs)),
                 sparse.combine(sparse.dispatch(inputs)), ELEMENTWISE,
                 what="combined")


def test_a_routers_choice_is_followed_not_recomputed():
    # A router (e.g. the sigmoid one, whose bias chooses) picked expert 1
    # for row 0 although its gate for expert 0 is larger.
    gates = tf.constant([[0.6, 0.4], [0.0, 1.0], [1.0, 0.0]])
    chosen = tf.constant([[1], [1], [0]])
    dispatcher = CapacityDispatcher(2, gates, k=1, capacity=1,
                                    expert_index=chosen)
    inputs = tf.constant([[1.0], [2.0], [3.0]])
    # Expert 1's one slot goes to row 0 (first in row order), row 1 drops.
    np.testing.assert_array_equal(
        dispatcher.dispatch(inputs)[:, :, 0], [[3.0], [1.0]])
    assert_close(dispatcher.combine(dispatcher.dispatch(inputs)),
                 [[0.4], [0.0], [3.0]], ELEMENTWISE, what="combined")
    # Given the top-k itself, the same as without it.
    top = CapacityDispatcher(2, gates, k=1, capacity=1,
                             expert_index=tf.constant([[0], [1], [0]]))
    plain = CapacityDispatcher(2, gates, k=1, capacity=1)
    np.testing.assert_array_equal(top.dispatch(inputs), plain.dispatch(inputs))


@pytest.mark.parametrize("capacity, error, message", [
    (0, ValueError, "capacity=0"),
    (tf.constant(0), ValueError, "capacity=0"),
    (2.0, TypeError, "capacity=2.0"),
    (True, TypeError, "capacity=True"),
    (tf.constant([2, 2]), TypeError, r"capacity.shape=\(2,\)"),
    (tf.constant(2.0), TypeError, "capacity.dtype=float32"),
])
def test_bad_capacity(capacity, error, message):
    with pytest.raises(error, match=message):
        CapacityDispatcher(2, tf.ones([3, 2]), k=1, capacity=capacity)


@pytest.mark.parametrize("capacity", [np.int32(2), tf.constant(2, tf.int64)])
def test_integer_capacity_of_any_kind(capacity):
    dispatcher = CapacityDispatcher(
        2, tf.constant([[0.6, 0.4], [0.0, 1.0]]), k=2, capacity=capacity
    )
    assert dispatcher.dispatch(np.ones((2, 3), "float32")).shape == (2, 2, 3)


def test_integer_outputs_are_not_weighted_by_truncated_gates():
    gates = tf.constant([[0.7, 0.3], [0.0, 1.0]])
    dispatcher = CapacityDispatcher(2, gates, k=2, capacity=2)
    with pytest.raises(TypeError, match="expert_out.dtype=int32"):
        dispatcher.combine(tf.ones([2, 2, 1], tf.int32))


def _pair(**kwargs):
    common = dict(hidden_sizes=(7,), gate_initializer="random_normal",
                  **kwargs)
    sparse = keras_moe.MixtureOfExperts(5, k=2, **common)
    # Factor num_experts / k: capacity = tokens, nothing can be dropped.
    capacity = keras_moe.MixtureOfExperts(
        5, k=2, dispatch="capacity", capacity_factor=2.5,
        eval_capacity_factor=2.5, **common,
    )
    sparse.build((None, 6))
    capacity.build((None, 6))
    capacity.set_weights(sparse.get_weights())
    return sparse, capacity


def _pair_data(masked):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 8, 6)).astype("float32")
    noise = rng.normal(size=(3, 8, 5)).astype("float32")
    mask = rng.random((3, 8)) > 0.25 if masked else None
    return x, noise, mask


def _outputs_routing_and_gradients(layer, x, noise, mask, training):
    with tf.GradientTape() as tape:
        y, routing = layer(x, training=training, noise=noise, mask=mask,
                           return_routing=True)
        loss = tf.reduce_sum(y**2) + routing["aux_loss"]
    grads = tape.gradient(loss, layer.trainable_variables)
    # The variables' paths within the layer (its own name differs).
    names = [v.path.split("/", 1)[1] for v in layer.trainable_variables]
    return y, routing, dict(zip(names, grads))


def _assert_capacity_equals_sparse(sparse_results, capacity_results):
    """The capacity layer's outputs, routing and gradients are the sparse
    layer's: exact where they are counts and indices, within the float32
    rule (tests/numerics.py) where they are sums in another order."""
    (y1, r1, g1), (y2, r2, g2) = sparse_results, capacity_results
    assert_close(y2, y1, FORWARD, what="outputs")
    assert float(r2["dropped_fraction"]) == 0.0
    for key in ("part_sizes", "expert_index", "token_index"):
        np.testing.assert_array_equal(r2[key], r1[key], err_msg=key)
    for key in ("gates", "importance", "load", "aux_loss", "expert_gates"):
        assert_close(r2[key], r1[key], FORWARD, what=key)
    assert list(g2) == list(g1)
    for name, a in g1.items():
        b = g2[name]
        if a is None:
            assert b is None, name
            continue
        assert_close(b, a, GRADIENT, what=f"gradient of {name}")


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("per_expert", [True, False],
                         ids=["per_expert", "batched"])
def test_equals_sparse_dispatch_when_nothing_is_dropped(
        training, masked, per_expert, monkeypatch):
    # Both forms of the experts' slabs: one matmul per expert (CPU) and
    # one batched matmul per layer (XLA, GPUs).
    monkeypatch.setattr(grouped_feed_forward, "_one_matmul_per_expert",
                        lambda: per_expert)
    sparse, capacity = _pair()
    x, noise, mask = _pair_data(masked)
    _assert_capacity_equals_sparse(
        _outputs_routing_and_gradients(sparse, x, noise, mask, training),
        _outputs_routing_and_gradients(capacity, x, noise, mask, training))


@pytest.mark.parametrize("per_expert", [True, False],
                         ids=["per_expert", "batched"])
def test_capacity_equals_sparse_catches_one_expert_off_by_1e_3(
        per_expert, monkeypatch):
    # The comparison above is sharp: the smallest defect that matters, one
    # expert's output kernel off by 1e-3 relative (here in the expert that
    # receives the fewest tokens, so the defect touches as little as it
    # can), fails it.
    monkeypatch.setattr(grouped_feed_forward, "_one_matmul_per_expert",
                        lambda: per_expert)
    sparse, capacity = _pair()
    x, noise, mask = _pair_data(masked=False)
    expected = _outputs_routing_and_gradients(sparse, x, noise, mask, True)
    part_sizes = np.asarray(expected[1]["part_sizes"])
    expert = int(np.argmin(np.where(part_sizes > 0, part_sizes, 10**9)))
    assert part_sizes[expert] > 0, part_sizes
    kernel = capacity.experts.kernels[-1]
    kernel.assign(tf.tensor_scatter_nd_update(
        kernel, [[expert]], kernel[expert:expert + 1] * (1 + 1e-3)))
    with pytest.raises(AssertionError, match="outputs"):
        _assert_capacity_equals_sparse(
            expected,
            _outputs_routing_and_gradients(capacity, x, noise, mask, True))


def test_small_capacity_drops_and_reports_it():
    layer = keras_moe.MixtureOfExperts(
        4, k=2, dispatch="capacity", capacity_factor=0.5, min_capacity=1,
        gate_initializer="random_normal",
    )
    x = np.random.default_rng(1).normal(size=(32, 6)).astype("float32")
    y, routing = layer(x, training=True, return_routing=True)
    # ceil(0.5 * 32 * 2 / 4) = 8 slots per expert, 64 choices.
    part_sizes = routing["part_sizes"].numpy()
    assert part_sizes.max() <= 8
    assert_close(routing["dropped_fraction"], 1 - part_sizes.sum() / 64,
                 ELEMENTWISE, what="dropped_fraction")
    assert float(routing["dropped_fraction"]) > 0
    # Every kept pair is exactly the first 8 wanting tokens of its expert.
    wanted = routing["gates"].numpy() > 0
    tokens = keras_moe.expert_to_tokens(routing)
    for e in range(4):
        np.testing.assert_array_equal(tokens[e], np.nonzero(wanted[:, e])[0][:8])


@pytest.mark.parametrize("training", [True, False])
def test_empty_batch(training):
    layer = keras_moe.MixtureOfExperts(
        4, k=2, output_dim=3, dispatch="capacity"
    )
    y, routing = layer(np.zeros([0, 5], "float32"), training=training,
                       return_routing=True)
    assert y.shape == (0, 3)
    np.testing.assert_array_equal(routing["part_sizes"], np.zeros(4))
    assert float(routing["dropped_fraction"]) == 0.0
    assert layer(np.zeros([2, 0, 5], "float32")).shape == (2, 0, 3)


def test_bad_input_under_xla_gives_nan_not_a_wrong_answer():
    # XLA does not run the assertion ops that reject these elsewhere.
    layer = keras_moe.MixtureOfExperts(
        4, k=2, dispatch="capacity", gate_initializer="random_normal"
    )
    x = np.random.default_rng(2).normal(size=(6, 5)).astype("float32")
    x[1, 1] = np.nan
    multiplier = np.array([1.0, 1.0, 0.5, -1.0, np.inf, 1.0], "float32")
    mask = np.array([True, True, True, True, True, False])
    run = tf.function(
        lambda x, m, mask: layer(x, gate_multiplier=m, mask=mask),
        jit_compile=True,
    )
    y = run(x, multiplier, mask).numpy()
    bad = np.array([False, True, False, True, True, False])
    assert np.isnan(y[bad]).all()
    np.testing.assert_array_equal(y[5], 0.0)  # masked: not read
    good = ~bad & mask
    expected = layer(x[good], gate_multiplier=multiplier[good])
    assert_close(y[good], expected, FORWARD, what="outputs under XLA")
    # Noise is read only while training, as outside XLA.
    noise = np.zeros((6, 4), "float32")
    noise[2, 0] = np.nan
    with_noise = tf.function(
        lambda x, noise, training: layer(x, noise=noise, training=training),
        jit_compile=True,
    )
    x[1, 1] = 0.0
    assert np.isfinite(with_noise(x, noise, False).numpy()).all()
    y = with_noise(x, noise, True).numpy()
    assert np.isnan(y[2]).all() and np.isfinite(np.delete(y, 2, 0)).all()


def _model(dispatch):
    inputs = keras.Input((8, 6))
    h = keras_moe.MixtureOfExperts(
        4, k=2, hidden_sizes=(8,), dispatch=dispatch, name="moe",
        gate_initializer="random_normal",
    )(inputs)
    return keras.Model(inputs, keras.layers.Dense(1)(h))


def test_saved_model_round_trip(tmp_path):
    # Keras's own round trips (config, .keras, an XLA fit step) are
    # tests/test_layer_contract.py's; export is this one's.
    model = _model("capacity")
    x = np.random.default_rng(3).normal(size=(5, 8, 6)).astype("float32")
    expected = model.predict(x, verbose=0)
    export_dir = os.path.join(tmp_path, "exported")
    model.export(export_dir, verbose=False)
    reloaded = tf.saved_model.load(export_dir)
    assert_close(reloaded.serve(tf.constant(x)), expected, FORWARD,
                 what="exported outputs")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dispatch": "dense"}, "dispatch='dense'"),
        ({"capacity_factor": 0.0}, "capacity_factor=0.0"),
        ({"eval_capacity_factor": -1.0}, "eval_capacity_factor=-1.0"),
        ({"min_capacity": 0}, "min_capacity=0"),
    ],
)
def test_bad_capacity_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        keras_moe.MixtureOfExperts(4, **kwargs)
