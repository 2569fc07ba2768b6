"""Routing introspection: each expert's tokens and gates, flat and
hierarchical, checked against the dense gates."""

import numpy as np
import pytest
import tensorflow as tf

import keras_moe


def _layers():
    return [
        keras_moe.MixtureOfExperts(
            5, k=2, gate_initializer="random_normal"
        ),
        keras_moe.HierarchicalMixtureOfExperts(
            3, 2, k=2, group_k=1, gate_initializer="random_normal"
        ),
    ]


def _expected_assignments(gates):
    """Per expert: flat token indices with a positive gate, and the gates."""
    flat = gates.reshape(-1, gates.shape[-1])
    return [
        (np.nonzero(flat[:, e] > 0)[0], flat[flat[:, e] > 0, e])
        for e in range(flat.shape[1])
    ]


@pytest.mark.parametrize("layer_index", [0, 1])
@pytest.mark.parametrize("masked", [False, True])
def test_tokens_and_gates_match_the_dense_gates(layer_index, masked):
    layer = _layers()[layer_index]
    rng = np.random.default_rng(layer_index)
    x = rng.normal(size=(3, 5, 4)).astype("float32")
    mask = rng.random((3, 5)) > 0.3 if masked else None
    _, routing = layer(x, mask=mask, training=True, return_routing=True)
    gates = routing["gates"].numpy()
    tokens = keras_moe.expert_to_tokens(routing)
    expert_gates = keras_moe.expert_to_gates(routing)
    assert len(tokens) == layer.num_experts
    for e, (want_tokens, want_gates) in enumerate(_expected_assignments(gates)):
        np.testing.assert_array_equal(tokens[e], want_tokens)
        # The gates themselves, gathered.
        np.testing.assert_array_equal(expert_gates[e], want_gates)
    if masked:
        routed = np.concatenate([t.numpy() for t in tokens])
        assert not np.isin(np.nonzero(~mask.reshape(-1))[0], routed).any()
        assert set(routed) == set(np.nonzero(mask.reshape(-1))[0])


def test_identifiers_of_any_dtype_and_trailing_shape():
    layer = _layers()[0]
    x = np.random.default_rng(5).normal(size=(2, 3, 4)).astype("float32")
    _, routing = layer(x, return_routing=True)
    words = tf.constant([["a", "b", "c"], ["d", "e", "f"]])
    positions = np.stack(np.meshgrid(np.arange(2), np.arange(3),
                                     indexing="ij"), -1).astype(np.int32)
    by_index = keras_moe.expert_to_tokens(routing)
    by_word = keras_moe.expert_to_tokens(routing, words)
    by_position = keras_moe.expert_to_tokens(routing, positions)
    flat_words = np.array([b"a", b"b", b"c", b"d", b"e", b"f"])
    for index, word, position in zip(by_index, by_word, by_position):
        np.testing.assert_array_equal(word, flat_words[index.numpy()])
        assert position.shape[1:] == (2,)
        np.testing.assert_array_equal(
            position, positions.reshape(-1, 2)[index.numpy()]
        )


def test_identifiers_with_wrong_leading_shape():
    layer = _layers()[0]
    _, routing = layer(np.ones((2, 3, 4), "float32"), return_routing=True)
    with pytest.raises(ValueError, match=r"identifiers.shape=\(6,\)"):
        keras_moe.expert_to_tokens(routing, tf.range(6))
    # The right rank, the wrong sizes: caught before any op runs.
    with pytest.raises(ValueError, match=r"identifiers.shape=\(3, 2\)"):
        keras_moe.expert_to_tokens(routing, tf.zeros((3, 2)))


def test_routing_joined_over_predict_batches_is_refused():
    import keras

    inputs = keras.Input((5,))
    y, routing = _layers()[0](inputs, return_routing=True)
    model = keras.Model(inputs, routing)
    x = np.random.default_rng(0).normal(size=(10, 5)).astype("float32")
    joined = model.predict(x, batch_size=4, verbose=0)
    assert joined["part_sizes"].shape == (15,)  # three batches' reports
    with pytest.raises(ValueError, match=r"one call.*part_sizes.shape=\(15,\)"):
        keras_moe.expert_to_tokens(joined)
    with pytest.raises(ValueError, match="part_sizes.shape"):
        keras_moe.expert_to_gates(joined)
    # One call's report, as numpy arrays, is fine.
    single = model.predict(x, batch_size=10, verbose=0)
    tokens = keras_moe.expert_to_tokens(single, np.arange(10))
    assert sum(len(t) for t in tokens) == 20
