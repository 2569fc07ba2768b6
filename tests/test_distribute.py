"""Data-parallel training under tf.distribute (in-process, on the 4 logical
CPUs that conftest.py makes): the balancing statistics are summed over the
global batch, so a step on R replicas is the step on one device; each
replica draws its own, reproducible gating noise; `model.fit` and a custom
`strategy.run` loop both train. (Multi-worker and kill/restart tests run
worker processes and live in their own files.)"""

import contextlib

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_moe
from numerics import FORWARD, STEP, assert_close
from strategies import mirrored

D = 6
GLOBAL_BATCH = 16
LEARNING_RATE = 0.1


def _scope(strategy):
    if strategy is None:
        return contextlib.nullcontext()
    return strategy.scope()


def _data(num_batches=1, seed=0):
    """Global batches whose quarters (each replica's share on up to 4
    replicas) come from different distributions, so that per-replica
    routing statistics differ from the global ones."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num_batches * GLOBAL_BATCH, D)).astype("float32")
    shifts = rng.normal(scale=1.5, size=(4, D)).astype("float32")
    x += np.tile(np.repeat(shifts, GLOBAL_BATCH // 4, axis=0),
                 (num_batches, 1))
    y = rng.normal(size=(num_batches * GLOBAL_BATCH, 1)).astype("float32")
    return x, y


def _flat_moe(cross_replica_balance=True, noisy_gating=False):
    return keras_moe.MixtureOfExperts(
        4, k=2, hidden_sizes=(8,), noisy_gating=noisy_gating, loss_coef=1.0,
        gate_initializer=keras.initializers.RandomNormal(stddev=1.0, seed=1),
        expert_initializer=keras.initializers.GlorotUniform(seed=2),
        cross_replica_balance=cross_replica_balance, seed=5, name="moe",
    )


def _hierarchical_moe(cross_replica_balance=True, noisy_gating=False):
    # k=2 of 2 groups and 2 of 2 experts routes every token everywhere, but
    # every gate is still a softmax with a gradient, and the importance
    # (summed over replicas or not) still drives the gating kernels.
    return keras_moe.HierarchicalMixtureOfExperts(
        2, 2, k=2, group_k=2, noisy_gating=noisy_gating, loss_coef=1.0,
        gate_initializer=keras.initializers.RandomNormal(stddev=1.0, seed=1),
        expert_initializer=keras.initializers.GlorotUniform(seed=2),
        cross_replica_balance=cross_replica_balance, seed=5, name="moe",
    )


def _model(make_moe, strategy=None, **moe_kwargs):
    """Input -> MoE -> Dense(1), compiled with plain SGD and no XLA."""
    with _scope(strategy):
        inputs = keras.Input((D,))
        hidden = make_moe(**moe_kwargs)(inputs)
        outputs = keras.layers.Dense(
            1, kernel_initializer=keras.initializers.GlorotUniform(seed=3),
            name="head",
        )(hidden)
        model = keras.Model(inputs, outputs)
        model.compile(
            optimizer=keras.optimizers.SGD(LEARNING_RATE), loss="mse",
            jit_compile=False,
        )
    return model


_REFERENCE_WEIGHTS = {}


def _reference_weights(make_moe):
    """Initial weights shared by every run of one architecture."""
    if make_moe not in _REFERENCE_WEIGHTS:
        _REFERENCE_WEIGHTS[make_moe] = _model(make_moe).get_weights()
    return _REFERENCE_WEIGHTS[make_moe]


def _initial_model(make_moe):
    model = _model(make_moe)
    model.set_weights(_reference_weights(make_moe))
    return model


def _fit_one_step(make_moe, strategy=None, x=None, y=None, **moe_kwargs):
    """Weights and logged loss after one `fit` step on one global batch."""
    if x is None:
        x, y = _data()
    model = _model(make_moe, strategy, **moe_kwargs)
    model.set_weights(_reference_weights(make_moe))
    history = model.fit(
        x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0
    )
    return model, history.history["loss"][0]


def _named_weights(model, trainable_only=False):
    weights = model.trainable_weights if trainable_only else model.weights
    return {w.path: w.numpy() for w in weights}


def _max_differences(model, other, trainable_only=False):
    a = _named_weights(model, trainable_only)
    b = _named_weights(other, trainable_only)
    assert a.keys() == b.keys()
    return {path: float(np.max(np.abs(a[path] - b[path]))) for path in a}


def _assert_same_steps(model, reference, make_moe, steps=1, paths=None,
                       trainable_only=False):
    """Every weight (or those in `paths`) of `model` moved from the shared
    initial weights as in `reference`: the updates compared by the rule of
    tests/numerics.py, at depth STEP per step. (The routing
    statistics kept as non-trainable weights start at zero, so their update
    is their value.)"""
    initial = _named_weights(_initial_model(make_moe), trainable_only)
    got = _named_weights(model, trainable_only)
    want = _named_weights(reference, trainable_only)
    assert got.keys() == want.keys() == initial.keys()
    for path in paths if paths is not None else want:
        assert_close(got[path] - initial[path], want[path] - initial[path],
                     STEP * steps, what=path)


_FIT_STEPS = {}


def _cached_fit_step(make_moe, num_replicas=None,
                     cross_replica_balance=True):
    """`_fit_one_step` on one device (None) or `num_replicas`, run once."""
    key = (make_moe, num_replicas, cross_replica_balance)
    if key not in _FIT_STEPS:
        strategy = None if num_replicas is None else mirrored(num_replicas)
        _FIT_STEPS[key] = _fit_one_step(
            make_moe, strategy, cross_replica_balance=cross_replica_balance
        )
    return _FIT_STEPS[key]


def _gating_paths(model):
    return [path for path in _named_weights(model) if "gat" in path]


@pytest.mark.parametrize(
    "make_moe, num_replicas",
    [(_flat_moe, 2), (_flat_moe, 4), (_hierarchical_moe, 2),
     (_hierarchical_moe, 4)],
    ids=["flat-2", "flat-4", "hierarchical-2", "hierarchical-4"],
)
def test_fit_step_is_replica_invariant(make_moe, num_replicas):
    single, _ = _cached_fit_step(make_moe)
    replicated, _ = _cached_fit_step(make_moe, num_replicas)
    # The step moved every weight, gating kernels included...
    moved = _max_differences(single, _initial_model(make_moe))
    gating = _gating_paths(single)
    assert gating and all(moved[path] > 1e-3 for path in gating), moved
    # ...and moved it as on one device.
    _assert_same_steps(replicated, single, make_moe)


def test_fit_step_without_cross_replica_balance_differs():
    single, _ = _cached_fit_step(_flat_moe)
    # On one device the flag changes nothing.
    single_off, _ = _fit_one_step(_flat_moe, cross_replica_balance=False)
    assert max(_max_differences(single_off, single).values()) == 0.0
    # On two replicas it does: each replica sums the balancing statistics
    # over its own half only, the smallest defect the replica-invariance
    # test must catch, and the gating kernels' step then fails its
    # comparison (the experts and the Dense layer get no gradient from the
    # balancing loss and stay equal).
    # (Trainable weights only: the routing statistics the layer keeps as
    # non-trainable weights are then per replica, not global.)
    replicated_off, _ = _cached_fit_step(_flat_moe, 2, False)
    gating = _gating_paths(single)
    assert gating
    for path in gating:
        with pytest.raises(AssertionError, match=path):
            _assert_same_steps(replicated_off, single, _flat_moe,
                               paths=[path], trainable_only=True)
    _assert_same_steps(
        replicated_off, single, _flat_moe, trainable_only=True,
        paths=[p for p in _named_weights(single, True) if p not in gating])


def test_fit_step_without_cross_replica_balance_balances_each_replica():
    # Each replica balances its own half: with plain SGD the step is the
    # mean of the one-device steps on each half.
    x, y = _data()
    replicated_off, _ = _cached_fit_step(_flat_moe, 2, False)
    half = GLOBAL_BATCH // 2
    halves = [
        _fit_one_step(_flat_moe, x=x[i * half:(i + 1) * half],
                      y=y[i * half:(i + 1) * half],
                      cross_replica_balance=False)[0]
        for i in range(2)
    ]
    initial = _named_weights(_initial_model(_flat_moe), True)
    expected = {
        path: (a + b) / 2 - initial[path] for (path, a), b in zip(
            _named_weights(halves[0], True).items(),
            _named_weights(halves[1], True).values(),
        )
    }
    # The reference adds the rounding of two steps, one per half.
    for path, value in _named_weights(replicated_off, True).items():
        assert_close(value - initial[path], expected[path],
                     STEP * len(halves), what=path)


def _per_replica_gates(seed, strategy, x, calls=2):
    """Training-mode gates of a fresh gating layer, the same `x` on every
    replica, for `calls` successive calls: `[call][replica] -> gates`."""
    with strategy.scope():
        gating = keras_moe.NoisyTopKGating(4, k=2, seed=seed)
        gating.build((None, D))
    same_inputs = strategy.experimental_distribute_values_from_function(
        lambda context: tf.constant(x)
    )

    @tf.function
    def step(inputs):
        return strategy.run(
            lambda v: gating(v, training=True)[0], args=(inputs,)
        )

    return [
        [t.numpy() for t in strategy.experimental_local_results(step(
            same_inputs))]
        for _ in range(calls)
    ]


def test_noise_differs_across_replicas_and_is_reproducible():
    strategy = mirrored(2)
    x = np.random.default_rng(3).normal(size=(32, D)).astype("float32")
    first = _per_replica_gates(7, strategy, x)
    for replicas in first:
        # Same tokens, different noise: different routing.
        assert not np.allclose(replicas[0], replicas[1]), replicas
        for gates in replicas:
            np.testing.assert_array_equal((gates > 0).sum(1), 2)
    # The stream advances on every replica between calls.
    for replica in range(2):
        assert not np.allclose(first[0][replica], first[1][replica])
    # A fresh layer with the same seed replays every draw of every replica.
    again = _per_replica_gates(7, strategy, x)
    np.testing.assert_array_equal(np.array(again), np.array(first))
    # Another seed gives other draws.
    other = _per_replica_gates(8, strategy, x)
    assert not np.allclose(np.array(other), np.array(first))


def _custom_loop(strategy, x, y, steps):
    """The loop docs/distributed.md shows: per-example losses averaged over
    the global batch, the layers' losses scaled by 1 / replicas."""
    with strategy.scope():
        model = _model(_flat_moe)
        model.set_weights(_reference_weights(_flat_moe))
        optimizer = keras.optimizers.SGD(LEARNING_RATE)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
    dataset = strategy.experimental_distribute_dataset(dataset)

    def step_fn(inputs, targets):
        with tf.GradientTape() as tape:
            predictions = model(inputs, training=True)
            per_example = tf.reduce_mean(tf.square(targets - predictions), -1)
            loss = tf.nn.compute_average_loss(
                per_example, global_batch_size=GLOBAL_BATCH
            )
            loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        return loss

    @tf.function
    def train_step(inputs, targets):
        losses = strategy.run(step_fn, args=(inputs, targets))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, losses, axis=None)

    losses = [float(train_step(*batch)) for batch in dataset]
    assert len(losses) == steps
    return model, losses


@pytest.fixture(scope="module")
def custom_loops():
    steps = 3
    x, y = _data(num_batches=steps, seed=1)
    return (_custom_loop(tf.distribute.get_strategy(), x, y, steps),
            _custom_loop(mirrored(2), x, y, steps))


def test_custom_loop_matches_single_device(custom_loops):
    (single, losses), (replicated, _) = custom_loops
    moved = _max_differences(single, _initial_model(_flat_moe))
    assert all(v > 1e-3 for path, v in moved.items() if "gat" in path), moved
    _assert_same_steps(replicated, single, _flat_moe, steps=len(losses))


def test_custom_loop_loss_matches_single_device(custom_loops):
    (_, single_losses), (_, replicated_losses) = custom_loops
    # The last step's loss comes after two steps' updates.
    assert_close(replicated_losses, single_losses,
                 STEP * len(single_losses))


def test_fit_logged_loss_matches_single_device():
    _, single_loss = _cached_fit_step(_flat_moe)
    _, replicated_loss = _cached_fit_step(_flat_moe, 2)
    assert_close(replicated_loss, single_loss, FORWARD)


def test_fit_with_noise_trains():
    strategy = mirrored(2)
    x, y = _data(num_batches=3, seed=2)
    model = _model(_flat_moe, strategy, noisy_gating=True)
    before = _named_weights(model)
    history = model.fit(
        x, y, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0
    )
    assert np.all(np.isfinite(history.history["loss"]))
    after = _named_weights(model)
    for path, value in after.items():
        assert np.all(np.isfinite(value)), path
    # The noise kernel is trained too (it only gets a gradient when noisy).
    noise_kernel = [p for p in after if "noise_kernel" in p]
    assert noise_kernel
    for path in noise_kernel:
        assert np.max(np.abs(after[path] - before[path])) > 0, path
