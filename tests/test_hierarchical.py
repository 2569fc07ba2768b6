"""HierarchicalMixtureOfExperts: the two-level layer's numbers, shapes,
loss, masks, serialization and export (parity with the original is in
test_parity.py, family "hierarchical")."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_moe
from graph_size import training_step_size
from numerics import ELEMENTWISE, FORWARD, assert_close

N1, N2, D = 3, 4, 5


def _layer(**kwargs):
    layer = keras_moe.HierarchicalMixtureOfExperts(
        N1, N2, gate_initializer=keras.initializers.RandomNormal(seed=1),
        **kwargs,
    )
    layer.build((None, D))
    return layer


def _dense_reference(layer, x, gates):
    """sum over (i, j) of gates[b, i * N2 + j] * expert_ij(x[b])."""
    outputs = [
        group.experts.call_expert(x, j).numpy()
        for group in layer.groups for j in range(group.num_experts)
    ]
    return np.einsum("be,ebo->bo", gates, np.stack(outputs))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("k, group_k", [(1, 1), (2, 2), (3, 4)])
def test_output_is_the_gate_weighted_sum_of_all_experts(k, group_k, training):
    layer = _layer(k=k, group_k=group_k, hidden_sizes=(6,))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(11, D)).astype("float32")
    noise = (rng.normal(size=(11, N1)).astype("float32"),
             rng.normal(size=(11, N1, N2)).astype("float32"))
    y, routing = layer(x, training=training, noise=noise, return_routing=True)
    gates = routing["gates"].numpy()
    assert gates.shape == (11, N1 * N2)
    assert_close(gates.sum(1), np.ones(11), FORWARD)
    nonzero = (gates > 0).reshape(11, N1, N2)
    np.testing.assert_array_equal(nonzero.any(2).sum(1), k)
    np.testing.assert_array_equal(nonzero.sum(2)[nonzero.any(2)], group_k)
    assert_close(y, _dense_reference(layer, x, gates), FORWARD)
    # The primary gates are each group's share of the combined gates.
    primary, _ = layer.primary_gating(x, training=training, noise=noise[0])
    assert_close(gates.reshape(11, N1, N2).sum(2), primary, FORWARD)
    assert_close(routing["importance"], gates.sum(0).reshape(N1, N2),
                 ELEMENTWISE)


def test_clean_gating_load_is_the_count():
    layer = _layer(noisy_gating=False)
    x = np.random.default_rng(1).normal(size=(20, D)).astype("float32")
    _, routing = layer(x, training=True, return_routing=True)
    counts = (routing["gates"].numpy() > 0).sum(0).reshape(N1, N2)
    np.testing.assert_array_equal(routing["load"], counts)
    np.testing.assert_array_equal(routing["part_sizes"], counts.reshape(-1))


def test_zero_gate_multiplier_counts_in_no_load():
    # Primary kernel = identity: tokens 0-1 go to group 0, 2-3 to group 1;
    # inside a group, the zero kernel's tie goes to expert 0.
    layer = keras_moe.HierarchicalMixtureOfExperts(
        2, 2, k=1, group_k=1, noisy_gating=False
    )
    layer.build((None, 2))
    layer.primary_gating.gate_kernel.assign(np.eye(2, dtype="float32"))
    x = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], "float32")
    for multiplier, load in [
        ([1, 1, 1, 1], [[2, 0], [2, 0]]),
        ([1, 1, 0, 0], [[2, 0], [0, 0]]),
        ([1, 0, 1, 1], [[1, 0], [2, 0]]),
    ]:
        _, routing = layer(x, gate_multiplier=np.array(multiplier, "float32"),
                           return_routing=True)
        np.testing.assert_array_equal(routing["load"], load)
        np.testing.assert_array_equal(
            routing["part_sizes"], np.ravel(load).astype(int)
        )


def test_one_loss_for_the_whole_layer():
    layer = _layer(loss_coef=0.5)
    x = np.random.default_rng(2).normal(size=(9, D)).astype("float32")
    _, routing = layer(x, training=True, return_routing=True)
    assert len(layer.losses) == 1
    expected = 0.5 * (keras_moe.cv_squared(routing["importance"])
                      + keras_moe.cv_squared(routing["load"]))
    assert_close(layer.losses[0], expected, FORWARD)
    assert all(group.loss_coef == 0.0 for group in layer.groups)


def test_max_overload_of_hierarchical_load_is_per_group():
    layer = _layer(k=1)
    x = np.random.default_rng(3).normal(size=(30, D)).astype("float32")
    _, routing = layer(x, training=True, return_routing=True)
    per_group = routing["load"].numpy().sum(1)
    assert_close(keras_moe.max_overload(routing["load"]),
                 np.float32(per_group.max() / (per_group.mean() + 1e-10)),
                 FORWARD)


@pytest.mark.parametrize("training", [True, False])
def test_any_rank_and_mask_equal_the_unmasked_rows(training):
    layer = _layer()
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 6, D)).astype("float32")
    noise = (rng.normal(size=(2, 6, N1)).astype("float32"),
             rng.normal(size=(2, 6, N1, N2)).astype("float32"))
    mask = rng.random((2, 6)) > 0.3
    y, routing = layer(x, mask=mask, noise=noise, training=training,
                       return_routing=True)
    kept_y, kept = layer(x[mask], noise=(noise[0][mask], noise[1][mask]),
                         training=training, return_routing=True)
    assert_close(y.numpy()[mask], kept_y, FORWARD, what="outputs")
    np.testing.assert_array_equal(y.numpy()[~mask], 0.0)
    for key in ("importance", "load", "aux_loss"):
        assert_close(routing[key], kept[key], FORWARD, what=key)


def test_graph_size_does_not_depend_on_the_number_of_groups():
    # The groups' weights are stacked and all groups computed at once: the
    # training step's graph is the same for any num_groups and
    # experts_per_group (past MAX_UNROLLED_EXPERTS groups, and experts in
    # all: below, grouped_feed_forward unrolls its per-expert matmuls).
    def train_step_size(num_groups, experts_per_group):
        layer = keras_moe.HierarchicalMixtureOfExperts(
            num_groups, experts_per_group, hidden_sizes=(4,))
        layer.build((None, D))
        return training_step_size(layer, D)

    size = train_step_size(33, 3)
    assert train_step_size(33, 7) == size
    assert train_step_size(99, 3) == size


def test_gating_inputs_feed_only_the_primary_gate():
    layer = keras_moe.HierarchicalMixtureOfExperts(
        N1, N2, noisy_gating=False, gate_initializer="random_normal"
    )
    rng = np.random.default_rng(5)
    x = rng.normal(size=(7, D)).astype("float32")
    gate_x = rng.normal(size=(7, 2)).astype("float32")
    y, routing = layer(x, gating_inputs=gate_x, return_routing=True)
    assert layer.primary_gating.gate_kernel.shape == (2, N1)
    assert all(g.gating.gate_kernel.shape == (D, N2) for g in layer.groups)
    primary, _ = layer.primary_gating(gate_x)
    gates = routing["gates"].numpy()
    assert_close(gates.reshape(7, N1, N2).sum(2), primary, FORWARD)
    assert_close(y, _dense_reference(layer, x, gates), FORWARD)


def test_bad_arguments():
    with pytest.raises(ValueError, match="group_k=5"):
        keras_moe.HierarchicalMixtureOfExperts(2, 4, group_k=5)
    with pytest.raises(ValueError, match="num_groups=0"):
        keras_moe.HierarchicalMixtureOfExperts(0, 4)
    with pytest.raises(ValueError, match="k=3"):
        keras_moe.HierarchicalMixtureOfExperts(2, 4, k=3)
    layer = _layer()
    with pytest.raises(ValueError, match="tuple of 2 tensors"):
        layer(np.ones((2, D), "float32"), training=True,
              noise=np.ones((2, N1), "float32"))
    with pytest.raises(ValueError, match=r"noise\[1\].shape=\(2, 3, 3\)"):
        layer(np.ones((2, D), "float32"), training=True,
              noise=(np.ones((2, N1), "float32"),
                     np.ones((2, N1, 3), "float32")))


def _model():
    inputs = keras.Input((4, D))
    h = keras_moe.HierarchicalMixtureOfExperts(
        N1, N2, hidden_sizes=(6,), output_dim=3,
        gate_initializer="random_normal", seed=3,
    )(inputs)
    return keras.Model(inputs, keras.layers.Dense(2)(h))


def test_saved_model_export(tmp_path):
    model = _model()
    x = np.random.default_rng(7).normal(size=(5, 4, D)).astype("float32")
    path = os.path.join(tmp_path, "exported")
    model.export(path, verbose=False)
    reloaded = tf.saved_model.load(path)  # keep it: it owns the variables
    served = reloaded.serve(tf.constant(x))
    assert_close(served, model.predict(x, verbose=0), FORWARD)


def test_groups_are_copies_of_the_stacked_weights():
    with pytest.raises(ValueError, match="built layer"):
        keras_moe.HierarchicalMixtureOfExperts(N1, N2).groups
    layer = _layer(hidden_sizes=(6,))
    groups = layer.groups
    assert [g.num_experts for g in groups] == [N2] * N1
    np.testing.assert_array_equal(
        groups[2].gating.gate_kernel, layer.secondary_gating.gate_kernel[2])
    np.testing.assert_array_equal(
        groups[2].experts.kernels[1],
        layer.experts.kernels[1][2 * N2:3 * N2])
    before = layer.experts.kernels[0].numpy()
    groups[0].experts.kernels[0].assign(
        tf.zeros_like(groups[0].experts.kernels[0]))
    np.testing.assert_array_equal(layer.experts.kernels[0], before)


@pytest.mark.parametrize("training", [True, False])
def test_capacity_dispatch_with_room_for_all_equals_the_sparse_one(training):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(13, D)).astype("float32")
    # A mask and a multiplier: masked and zeroed tokens take no slot.
    mask = rng.random(13) > 0.2
    multiplier = np.where(rng.random(13) > 0.2, 1.5, 0.0).astype("float32")
    noise = (rng.normal(size=(13, N1)).astype("float32"),
             rng.normal(size=(13, N1, N2)).astype("float32"))
    sparse = _layer(k=2, group_k=2, hidden_sizes=(6,))
    capacity = _layer(k=2, group_k=2, hidden_sizes=(6,),
                      dispatch="capacity", capacity_factor=float(N1),
                      eval_capacity_factor=float(N1))
    capacity.set_weights(sparse.get_weights())
    results = []
    for layer in (sparse, capacity):
        with tf.GradientTape() as tape:
            y, routing = layer(x, training=training, noise=noise, mask=mask,
                               gate_multiplier=multiplier,
                               return_routing=True)
            loss = tf.reduce_sum(y ** 2) + sum(layer.losses)
        results.append((y, routing, tape.gradient(
            loss, layer.trainable_variables)))
    (y, want, want_grads), (got_y, got, got_grads) = results
    assert_close(got_y, y, FORWARD)
    assert float(got["dropped_fraction"]) == 0.0
    for key in ("gates", "importance", "load", "aux_loss", "expert_gates"):
        assert_close(got[key], want[key], FORWARD, what=key)
    for key in ("part_sizes", "expert_index", "token_index"):
        np.testing.assert_array_equal(got[key], want[key])
    for got_grad, want_grad in zip(got_grads, want_grads):
        assert_close(got_grad, want_grad, FORWARD)


def test_capacity_dispatch_drops_choices_past_a_groups_slots():
    # One slot per group: each group takes its first token in token order.
    layer = _layer(k=1, group_k=1, dispatch="capacity", min_capacity=1,
                   capacity_factor=1e-3, eval_capacity_factor=1e-3)
    x = np.random.default_rng(5).normal(size=(9, D)).astype("float32")
    y, routing = layer(x, return_routing=True)
    primary, _ = layer.primary_gating(x)
    group = np.argmax(primary.numpy(), 1)
    first = {g: int(np.argmax(group == g)) for g in set(group)}
    kept = sorted(first.values())
    np.testing.assert_array_equal(np.sort(routing["token_index"]), kept)
    assert_close(routing["dropped_fraction"], 1 - len(kept) / 9, FORWARD)
    dropped = np.setdiff1d(np.arange(9), kept)
    np.testing.assert_array_equal(y.numpy()[dropped], 0.0)
    assert routing["load"].numpy().sum() == pytest.approx(len(kept))
