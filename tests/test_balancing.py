"""The MoE layer's balancing loss: it is what the paper says, and it
balances. (The statistics it is built from are tested in test_balance.py;
both check against the one NumPy CV^2 of tests/balance_reference.py.)"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import balance_reference as reference
import keras_moe
from numerics import ELEMENTWISE, FORWARD, assert_close

D, NUM_EXPERTS, K = 8, 8, 2


def _skewed_inputs(rng, batch):
    # A strong component shared by every token: with random gate weights the
    # logits of all tokens rank the experts alike, so an unbalanced gate
    # sends nearly everything to the same few experts.
    return (1.0 + 0.5 * rng.normal(size=(batch, D))).astype("float32")


def _train(loss_coef, steps=150, seed=0):
    """Trains a lone MoE layer on a linear task that one expert can fit
    alone (so nothing but the balancing loss asks for balance); returns
    (CV^2 of the held-out load before, after, routing after)."""
    keras.utils.set_random_seed(seed)
    rng = np.random.RandomState(seed)
    target = rng.normal(size=(D, D)).astype("float32")
    layer = keras_moe.MixtureOfExperts(
        NUM_EXPERTS,
        k=K,
        loss_coef=loss_coef,
        gate_initializer=keras.initializers.RandomNormal(
            stddev=1.0, seed=seed
        ),
        expert_initializer=keras.initializers.GlorotUniform(seed=seed),
        seed=seed,
    )
    layer.build((None, D))
    optimizer = keras.optimizers.Adam(1e-2)

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            outputs = layer(x, training=True)
            loss = tf.reduce_mean(tf.square(outputs - y)) + tf.add_n(
                layer.losses
            )
        variables = layer.trainable_variables
        optimizer.apply_gradients(zip(tape.gradient(loss, variables),
                                      variables))
        return loss

    held_out = _skewed_inputs(np.random.RandomState(10_000 + seed), 1024)
    _, routing = layer(held_out, training=False, return_routing=True)
    before = reference.cv_squared(routing["load"])
    for _ in range(steps):
        x = _skewed_inputs(rng, 256)
        loss = train_step(x, x @ target)
    assert np.isfinite(float(loss))
    _, routing = layer(held_out, training=False, return_routing=True)
    return before, reference.cv_squared(routing["load"]), routing


def test_balancing_loss_balances_the_load():
    start, unbalanced, _ = _train(loss_coef=0.0)
    start_again, balanced, routing = _train(loss_coef=1.0)
    # Same seeds, same start: the only difference is the loss. (The
    # inference load is a count, so its CV^2 is the same number.)
    np.testing.assert_array_equal(start_again, start)
    # The random gate starts clearly unbalanced ...
    assert start > 1.0, start
    # ... stays unbalanced without the balancing loss ...
    assert unbalanced > 0.5 * start, (start, unbalanced)
    # ... and is balanced with it.
    assert balanced < 0.5 * unbalanced, (balanced, unbalanced)
    assert balanced < 0.25, balanced
    load = np.asarray(routing["load"])
    assert np.all(load > 0), load  # every expert is used
    # The inference load is the true count: k experts a token.
    np.testing.assert_array_equal(load, np.round(load))
    np.testing.assert_array_equal(load.sum(), 1024 * K)


@pytest.mark.parametrize("loss_coef", [0.0, 1e-2, 0.7])
@pytest.mark.parametrize(
    "training, noisy_gating",
    [(False, True), (True, True), (True, False), (False, False)],
    ids=["inference", "training", "training_not_noisy", "inference_not_noisy"],
)
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_aux_loss_is_cv_squared_of_own_routing(
    loss_coef, training, noisy_gating, masked
):
    layer = keras_moe.MixtureOfExperts(
        NUM_EXPERTS, k=3, hidden_sizes=(4,), loss_coef=loss_coef,
        noisy_gating=noisy_gating, gate_initializer="random_normal", seed=3,
    )
    rng = np.random.RandomState(0)
    x = _skewed_inputs(rng, 24).reshape(4, 6, D)
    mask = rng.uniform(size=(4, 6)) < 0.7 if masked else None

    _, routing = layer(x, training=training, mask=mask, return_routing=True)

    importance = np.asarray(routing["importance"])
    load = np.asarray(routing["load"])
    gates = np.asarray(routing["gates"]).reshape(-1, NUM_EXPERTS)
    assert_close(importance, gates.sum(0), ELEMENTWISE, what="importance")
    expected = loss_coef * (reference.cv_squared(importance)
                            + reference.cv_squared(load))
    assert len(layer.losses) == 1
    aux = layer.losses[0]
    assert aux.dtype == "float32" and aux.shape == ()
    # Float32 against float64 from the same importance and load. CV^2 does
    # not cancel (the mean's rounding enters only at second order), and
    # with loss_coef = 0 both are exactly 0.
    assert_close(aux, expected, FORWARD, what="layer.losses[0]")
    assert_close(routing["aux_loss"], expected, FORWARD, what="aux_loss")
    # keras_moe.cv_squared is the same function.
    assert_close(keras_moe.cv_squared(importance),
                 reference.cv_squared(importance),
                 FORWARD, what="cv_squared(importance)")
    if loss_coef > 0:
        # The skewed inputs leave the experts unevenly loaded: a real loss.
        assert expected > 1e-3 * loss_coef


def test_aux_loss_is_part_of_the_compiled_loss():
    inputs = keras.Input((D,))
    moe = keras_moe.MixtureOfExperts(NUM_EXPERTS, k=K, loss_coef=0.5,
                                     gate_initializer="random_normal",
                                     name="moe")
    model = keras.Model(inputs, moe(inputs))
    model.compile(optimizer="sgd", loss="mse")
    rng = np.random.RandomState(1)
    x = _skewed_inputs(rng, 64)
    y = rng.normal(size=(64, D)).astype("float32")

    outputs, routing = moe(x, return_routing=True)  # inference: no noise
    mse = np.mean((np.asarray(outputs) - y) ** 2)
    aux = 0.5 * (reference.cv_squared(routing["importance"])
                 + reference.cv_squared(routing["load"]))
    assert aux > 1e-3

    evaluated = model.evaluate(x, y, batch_size=64, verbose=0,
                               return_dict=True)["loss"]
    assert_close(evaluated, mse + aux, FORWARD, what="evaluated loss")
