"""Routing metrics in fit and evaluate logs, checked against the layer's
own routing on the same batch, on one device and under MirroredStrategy."""

import contextlib

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_moe
from numerics import ELEMENTWISE, FORWARD, assert_close
from strategies import mirrored

KEYS = ("aux_loss", "importance_cv2", "load_cv2", "max_overload")


def _model(layer_cls=keras_moe.MixtureOfExperts, **kwargs):
    inputs = keras.Input((6,))
    if layer_cls is keras_moe.HierarchicalMixtureOfExperts:
        assert not kwargs.pop("dispatch", None)
    if layer_cls is keras_moe.MixtureOfExperts:
        layer = layer_cls(5, k=2, name="moe", noisy_gating=False,
                          gate_initializer=keras.initializers.RandomNormal(
                              seed=2), loss_coef=0.1, **kwargs)
    else:
        layer = layer_cls(3, 2, k=1, group_k=1, name="moe",
                          noisy_gating=False,
                          gate_initializer=keras.initializers.RandomNormal(
                              seed=2), loss_coef=0.1, **kwargs)
    model = keras.Model(inputs, keras.layers.Dense(1)(layer(inputs)))
    # A zero learning rate keeps the weights, so the layer's routing after
    # fit is the routing the metrics saw.
    model.compile(keras.optimizers.SGD(0.0), "mse")
    return model, layer


def _data():
    rng = np.random.default_rng(0)
    return (rng.normal(size=(16, 6)).astype("float32"),
            rng.normal(size=(16, 1)).astype("float32"))


def _expected(layer, x):
    _, routing = layer(x, training=True, return_routing=True)
    return {
        "aux_loss": float(routing["aux_loss"]),
        "importance_cv2": float(keras_moe.cv_squared(routing["importance"])),
        "load_cv2": float(keras_moe.cv_squared(routing["load"])),
        "max_overload": float(keras_moe.max_overload(routing["load"])),
    }


@pytest.mark.parametrize(
    "layer_cls",
    [keras_moe.MixtureOfExperts, keras_moe.HierarchicalMixtureOfExperts],
)
def test_fit_and_evaluate_report_the_layers_routing(layer_cls):
    model, layer = _model(layer_cls)
    x, y = _data()
    history = model.fit(x, y, batch_size=16, epochs=1, shuffle=False,
                        verbose=0)
    expected = _expected(layer, x)
    assert expected["load_cv2"] > 0 and expected["max_overload"] > 1
    for key in KEYS:
        assert_close(history.history[f"moe_{key}"][0], expected[key],
                     FORWARD, what=key)
    results = model.evaluate(x, y, batch_size=16, verbose=0,
                             return_dict=True)
    for key in KEYS:
        assert_close(results[f"moe_{key}"], expected[key], FORWARD, what=key)


def test_metrics_are_global_under_mirrored_strategy():
    x, y = _data()
    reference_model, reference_layer = _model()
    expected = _expected(reference_layer, x)
    strategy = mirrored(2)
    with strategy.scope():
        model, _ = _model()
    model.set_weights(reference_model.get_weights())
    history = model.fit(x, y, batch_size=16, epochs=1, shuffle=False,
                        verbose=0)
    for key in KEYS:
        assert_close(history.history[f"moe_{key}"][0], expected[key],
                     FORWARD, what=key)


def test_metrics_can_be_turned_off():
    model, layer = _model(routing_metrics=False)
    x, y = _data()
    history = model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert not [key for key in history.history if key.startswith("moe_")]
    assert layer.metrics == []
    assert layer.get_config()["routing_metrics"] is False


def test_last_training_batch_statistics_are_kept_for_callbacks():
    model, layer = _model()
    x, y = _data()
    np.testing.assert_array_equal(layer.last_load.numpy(), np.zeros(5))
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    _, routing = layer(x, training=True, return_routing=True)
    assert_close(layer.last_load, routing["load"], FORWARD, what="load")
    assert_close(layer.last_importance, routing["importance"], FORWARD,
                 what="importance")
    before = layer.last_load.numpy().copy()
    layer(x[:3], training=False)
    np.testing.assert_array_equal(layer.last_load.numpy(), before)
    assert not layer.last_load.trainable


@pytest.mark.parametrize("replicas", [1, 2])
@pytest.mark.parametrize(
    "layer_cls, dispatch",
    [(keras_moe.MixtureOfExperts, "sparse"),
     (keras_moe.MixtureOfExperts, "capacity"),
     (keras_moe.HierarchicalMixtureOfExperts, None)],
)
def test_a_batch_without_tokens_moves_no_metric(layer_cls, dispatch,
                                                replicas):
    """An empty batch (a dataset's last, say) routes nothing: fit and
    evaluate report what they report without it."""
    strategy = mirrored(replicas) if replicas > 1 else None
    with strategy.scope() if strategy else contextlib.nullcontext():
        model, layer = _model(layer_cls, dispatch=dispatch)
    x, y = _data()
    batch = tf.data.Dataset.from_tensors((x, y))
    with_empty = batch.concatenate(
        tf.data.Dataset.from_tensors((x[:0], y[:0])))
    keys = ["loss"] + [f"moe_{key}" for key in KEYS] + (
        ["moe_dropped_fraction"] if dispatch == "capacity" else [])
    expected = model.evaluate(batch, verbose=0, return_dict=True)
    got = model.evaluate(with_empty, verbose=0, return_dict=True)
    for key in keys:
        assert_close(got[key], expected[key], ELEMENTWISE, what=key)
    expected = model.fit(batch, verbose=0).history
    statistics = [layer.last_importance.numpy(), layer.last_load.numpy()]
    assert np.any(statistics[1] > 0)
    got = model.fit(with_empty, verbose=0).history
    for key in keys:
        assert_close(got[key][0], expected[key][0], ELEMENTWISE, what=key)
    # The empty batch came last: the statistics are still the batch's.
    assert_close(layer.last_importance.numpy(), statistics[0], ELEMENTWISE,
                 what="last_importance")
    assert_close(layer.last_load.numpy(), statistics[1], ELEMENTWISE,
                 what="last_load")


def test_a_fully_masked_batch_moves_no_metric():
    _, layer = _model()
    x, _ = _data()
    layer(x, training=True)
    before = {m.name: float(m.result()) for m in layer.metrics}
    load = layer.last_load.numpy()
    layer(x, training=True, mask=np.zeros(len(x), bool))
    layer(x[:0], training=True)
    for metric in layer.metrics:
        assert_close(float(metric.result()), before[metric.name],
                     ELEMENTWISE, what=metric.name)
    np.testing.assert_array_equal(layer.last_load.numpy(), load)


# --------------------------------------------------------------------------
# Which threads see the balancing loss.
# --------------------------------------------------------------------------


def test_a_loss_added_outside_a_strategy_shows_in_every_thread():
    """As for Keras's own layers (an activity regularizer here)."""
    import threading

    moe = keras_moe.MixtureOfExperts(4, k=2)
    dense = keras.layers.Dense(3, activity_regularizer="l2")
    x, _ = _data()
    thread = threading.Thread(target=lambda: (moe(x), dense(x)))
    thread.start()
    thread.join()
    assert len(dense.losses) == 1
    assert len(moe.losses) == 1
    expected = moe(x, return_routing=True)[1]["aux_loss"]
    assert_close(float(moe.losses[0]), float(expected), ELEMENTWISE,
                 what="aux_loss")


def test_each_replica_reads_its_own_loss():
    """Inside `strategy.run` the replicas call the layer in parallel
    threads, which meet at the all-reduce of the statistics, after both
    cleared the losses of the previous call: each reads the one loss it
    added, not the other's too."""
    strategy = mirrored(2)
    x, _ = _data()
    with strategy.scope():
        moe = keras_moe.MixtureOfExperts(
            4, k=2, noisy_gating=False,
            gate_initializer=keras.initializers.RandomNormal(seed=2))
        moe.build((None, 6))
    dataset = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices(x).batch(16))

    @tf.function
    def step(batch):
        def replica_fn(inputs):
            moe(inputs)
            return tf.stack([tf.cast(len(moe.losses), tf.float32),
                             tf.add_n(moe.losses)])
        return strategy.run(replica_fn, args=(batch,))

    per_replica = strategy.experimental_local_results(
        step(next(iter(dataset))))
    # The balancing loss of the global batch, on every replica.
    expected = float(moe(x, return_routing=True)[1]["aux_loss"])
    for got in per_replica:
        count, loss = got.numpy()
        assert count == 1
        assert_close(loss, expected, ELEMENTWISE, what="aux_loss")


@pytest.mark.parametrize("router_kwargs, keys", [
    # The switch loss is the whole auxiliary loss (loss_coef=1).
    (dict(router="softmax_top_k", loss_coef=1.0),
     ("aux_loss", "switch_loss", "load_cv2", "max_overload")),
    (dict(router="sigmoid_top_k", loss_coef=1.0),
     ("aux_loss", "switch_loss", "load_cv2", "max_overload",
      "bias_spread")),
    # No balancing loss: the z-loss is the whole auxiliary loss.
    (dict(router="expert_choice", dispatch="capacity", capacity_factor=0.25,
          eval_capacity_factor=0.25, min_capacity=1, router_z_loss_coef=1.0),
     ("aux_loss", "load_cv2", "max_overload", "z_loss",
      "dropped_fraction")),
], ids=["softmax_top_k", "sigmoid_top_k", "expert_choice"])
def test_each_router_logs_its_metrics(router_kwargs, keys):
    inputs = keras.Input((6,))
    layer = keras_moe.MixtureOfExperts(
        5, k=2, name="moe", gate_initializer=keras.initializers.RandomNormal(
            seed=2), **router_kwargs)
    model = keras.Model(inputs, keras.layers.Dense(1)(layer(inputs)))
    model.compile(keras.optimizers.SGD(0.0), "mse")
    x, y = _data()
    # The routing fit's one batch sees (inference routes alike here, and
    # leaves the sigmoid router's bias at zero, as fit found it).
    _, routing = layer(x, return_routing=True)
    history = model.fit(x, y, batch_size=16, epochs=1, verbose=0).history
    assert sorted(k for k in history if k.startswith("moe_")) == sorted(
        f"moe_{key}" for key in keys)
    expected = {
        "aux_loss": float(routing["aux_loss"]),
        "switch_loss": float(routing["aux_loss"]),
        "z_loss": float(routing["aux_loss"]),
        "load_cv2": float(keras_moe.cv_squared(routing["load"])),
        "max_overload": float(keras_moe.max_overload(routing["load"])),
        "dropped_fraction": float(routing.get("dropped_fraction", 0.0)),
    }
    if "bias_spread" in keys:
        # Logged after the step's update: u * (1 - (-1)) once the load is
        # uneven.
        bias = layer.gating.expert_bias.numpy()
        expected["bias_spread"] = float(bias.max() - bias.min())
        assert expected["bias_spread"] == pytest.approx(2e-3)
    if "dropped_fraction" in keys:
        # 4 slots for each of 5 experts: some of the 16 tokens get none.
        assert expected["dropped_fraction"] > 0
    else:
        assert expected["load_cv2"] > 0
    for key in keys:
        assert_close(history[f"moe_{key}"][0], expected[key], FORWARD,
                     floor=1e-3, what=key)
