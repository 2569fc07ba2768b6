"""Every private Keras/TensorFlow hook in `keras_moe.private_hooks` is still
where it was and still does what keras_moe relies on. A failure here names
the hook and the installed Keras and TensorFlow: the upgrade moved it, and
`keras_moe/private_hooks.py` must follow."""

import threading

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_moe import private_hooks
from strategies import mirrored


def _moved(hook, what):
    return (
        f"private hook {hook}: {what} under {private_hooks.versions()}; "
        "keras_moe/private_hooks.py must follow the upgrade"
    )


# --- control_flow_util.GraphOrParentsInXlaContext --------------------------

def test_control_flow_util_still_importable():
    hook = "tensorflow.python.ops.control_flow_util"
    assert private_hooks.control_flow_util is not None, _moved(
        hook, "the module no longer imports"
    )
    assert callable(
        getattr(private_hooks.control_flow_util,
                "GraphOrParentsInXlaContext", None)
    ), _moved(hook, "GraphOrParentsInXlaContext is gone")


def test_control_flow_util_detects_an_xla_context():
    hook = "control_flow_util.GraphOrParentsInXlaContext"

    def tracing():
        return tf.constant(bool(private_hooks.xla_tracing()))

    assert private_hooks.xla_tracing() is False, _moved(
        hook, "eager code is taken for XLA"
    )
    assert not bool(tf.function(tracing)()), _moved(
        hook, "a plain tf.function is taken for XLA"
    )
    assert bool(tf.function(tracing, jit_compile=True)()), _moved(
        hook, "a jit_compile=True function is not detected"
    )


def test_xla_tracing_cannot_tell_without_control_flow_util(monkeypatch):
    monkeypatch.setattr(private_hooks, "control_flow_util", None)
    assert private_hooks.xla_tracing() is None


# --- Layer._losses ----------------------------------------------------------

class _LossLayer(keras.layers.Layer):
    _losses = private_hooks.replica_thread_losses

    def call(self, x):
        self.add_loss(tf.reduce_sum(x))
        return x


def test_keras_keeps_add_loss_terms_in_layer_losses_attribute():
    hook = "keras.layers.Layer._losses"
    layer = _LossLayer()
    layer.add_loss(tf.constant(1.0))
    assert len(layer.__dict__.get("_shared_losses", [])) == 1, _moved(
        hook, "add_loss no longer appends to `_losses`"
    )
    assert len(layer.losses) == 1, _moved(
        hook, "Layer.losses no longer reads `_losses`"
    )
    layer(tf.ones([2]))  # `__call__` clears the list before `call`
    assert [float(v) for v in layer.losses] == [2.0], _moved(
        hook, "__call__ no longer clears `_losses`"
    )


def test_losses_shared_between_threads_outside_a_strategy():
    layer = _LossLayer()
    thread = threading.Thread(
        target=lambda: layer.add_loss(tf.constant(3.0))
    )
    thread.start()
    thread.join()
    assert [float(v) for v in layer.losses] == [3.0]


def test_losses_per_replica_thread_under_mirrored_strategy():
    hook = "keras.layers.Layer._losses (per replica thread)"
    strategy = mirrored(2)
    with strategy.scope():
        layer = _LossLayer()
    threads = set()

    def replica_fn():
        threads.add(threading.get_ident())
        context = tf.distribute.get_replica_context()
        layer.add_loss(tf.cast(context.replica_id_in_sync_group, tf.float32))
        return tf.constant(len(layer.losses))

    counts = strategy.experimental_local_results(strategy.run(replica_fn))
    assert len(threads) == 2, _moved(
        hook, "MirroredStrategy no longer runs its replicas in threads of "
        "their own"
    )
    assert [int(c) for c in counts] == [1, 1], _moved(
        hook, "one replica thread sees another's losses"
    )
    assert layer.losses == [], "a replica's loss leaked outside the strategy"


# --- Layer._flatten_layers --------------------------------------------------

def test_flatten_layers_finds_nested_sublayers():
    hook = "keras.layers.Layer._flatten_layers"

    class Outer(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.inner = keras.layers.Dense(2, name="inner")

        def call(self, x):
            return self.inner(x)

    inputs = keras.Input((3,))
    outer = Outer(name="outer")
    model = keras.Model(inputs, outer(inputs))
    assert hasattr(model, "_flatten_layers"), _moved(hook, "it is gone")
    names = [layer.name for layer in private_hooks.all_sublayers(model)]
    assert "outer" in names and "inner" in names, _moved(
        hook, f"it found {names}, not the nested layers"
    )
    assert model.name not in names, _moved(
        hook, "include_self=False includes the model"
    )


# --- one attribute per item for tf.train.Checkpoint -------------------------

class _Holder(keras.layers.Layer):
    def build(self, input_shape=None):
        private_hooks.set_checkpointable_list(
            self, "kernel",
            [
                self.add_weight(name=f"kernel_{i}", shape=(2,),
                                initializer="random_normal")
                for i in range(3)
            ],
        )
        private_hooks.set_checkpointable_list(
            self, "sub", [keras.layers.Dense(2) for _ in range(2)]
        )
        for sub in private_hooks.checkpointable_list(self, "sub", 2):
            sub.build((None, 2))


def test_checkpoint_saves_the_items_kept_as_attributes(tmp_path):
    hook = "tf.train.Checkpoint following layer attributes"
    saved = _Holder()
    saved.build()
    path = tf.train.Checkpoint(layer=saved).save(str(tmp_path / "ckpt"))
    names = [name for name, _ in tf.train.list_variables(path)]
    for prefix in ("kernel_0", "kernel_1", "kernel_2", "sub_0", "sub_1"):
        assert any(f"layer/{prefix}/" in name for name in names), _moved(
            hook, f"`{prefix}` is not in the checkpoint ({names})"
        )
    restored = _Holder()
    restored.build()
    status = tf.train.Checkpoint(layer=restored).restore(path)
    status.assert_consumed()
    for a, b in zip(saved.weights, restored.weights):
        np.testing.assert_array_equal(
            a.numpy(), b.numpy(), err_msg=_moved(hook, f"{a.path} differs")
        )


def test_checkpointable_list_gives_back_the_items_in_order():
    owner = keras.layers.Layer()
    items = [keras.layers.Dense(1, name=f"d{i}") for i in range(3)]
    private_hooks.set_checkpointable_list(owner, "group", items)
    assert private_hooks.checkpointable_list(owner, "group", 3) == items
    with pytest.raises(AttributeError):
        private_hooks.checkpointable_list(owner, "group", 4)


# --- collective_ops.all_to_all_v2 through the strategy's launchers ----------

def test_strategy_collective_launchers_still_there():
    hook = "MirroredStrategy.extended._collective_ops._launchers"
    launchers = getattr(getattr(mirrored(2).extended, "_collective_ops",
                                None), "_launchers", None)
    assert launchers and len(launchers) == 2, _moved(hook, "no launchers")
    for name in ("_next_instance_key", "_get_ordering_token", "_group_key",
                 "_group_size", "_device"):
        assert hasattr(launchers[0], name), _moved(hook, f"{name} is gone")
    assert private_hooks.collective_ops is not None and hasattr(
        private_hooks.collective_ops, "all_to_all_v2"), _moved(
        "collective_ops.all_to_all_v2", "it no longer imports")


def test_collective_all_to_all_exchanges_slices_between_replicas():
    hook = "collective_ops.all_to_all_v2"
    strategy = mirrored(2)

    def exchange(x):
        replica = tf.get_static_value(
            tf.distribute.get_replica_context().replica_id_in_sync_group)
        return private_hooks.collective_all_to_all(x, strategy, replica, 60)

    values = strategy.experimental_distribute_values_from_function(
        lambda context: tf.constant(
            [[10.0 * context.replica_id_in_sync_group],
             [10.0 * context.replica_id_in_sync_group + 1]]))
    received = strategy.experimental_local_results(
        tf.function(lambda v: strategy.run(exchange, args=(v,)))(values))
    # Replica r gets slice r of what each replica sent.
    np.testing.assert_array_equal(received[0], [[0.0], [10.0]],
                                  err_msg=_moved(hook, "wrong exchange"))
    np.testing.assert_array_equal(received[1], [[1.0], [11.0]],
                                  err_msg=_moved(hook, "wrong exchange"))


# --- numpy_dataset.SingleDevice ---------------------------------------------

def test_single_device_creation_makes_a_plain_variable_on_that_device():
    hook = "numpy_dataset.SingleDevice"
    with mirrored(2).scope():
        with private_hooks.on_one_device("/cpu:1"):
            variable = tf.Variable(1.0)
        mirrored_variable = tf.Variable(1.0)
    assert not isinstance(variable, tf.distribute.DistributedValues), _moved(
        hook, "the variable is still mirrored")
    assert variable.device.endswith("CPU:1"), _moved(
        hook, f"placed on {variable.device}")
    assert isinstance(mirrored_variable, tf.distribute.DistributedValues)


# --- Optimizer._use_weight_decay --------------------------------------------

def test_optimizer_use_weight_decay_honours_exclusions():
    hook = "Optimizer._use_weight_decay"
    optimizer = keras.optimizers.AdamW(weight_decay=0.1)
    kept, excluded = keras.Variable(1.0, name="kept"), keras.Variable(
        1.0, name="bias")
    optimizer.exclude_from_weight_decay(var_names=["bias"])
    optimizer.build([kept, excluded])
    assert private_hooks.uses_weight_decay(optimizer, kept) is True, _moved(
        hook, "a decayed variable reads as excluded")
    assert private_hooks.uses_weight_decay(optimizer, excluded) is False, (
        _moved(hook, "an excluded variable reads as decayed"))


# --- Layer._tracker.replace_tracked_value ------------------------------------

class _TwoDense(keras.layers.Layer):
    def build(self, input_shape):
        self.first = keras.layers.Dense(2, name="first")
        self.first.build(input_shape)
        self.second = keras.layers.Dense(3, name="second")
        self.second.build((None, 2))

    def call(self, x):
        return self.second(self.first(x))


def test_replace_sublayer_of_a_built_layer_in_its_place():
    hook = "Layer._tracker.replace_tracked_value"
    layer = _TwoDense()
    layer.build((None, 4))
    # Keras refuses new state in a built layer: what the hook is for.
    with pytest.raises(ValueError, match="already built"):
        layer.first = keras.layers.Dense(2)
    new = keras.layers.Dense(2, name="new")
    new.build((None, 4))
    old = layer.first
    private_hooks.replace_sublayer(layer, "first", new)
    assert layer.first is new
    assert [id(w) for w in layer.weights] == [
        id(new.kernel), id(new.bias), id(layer.second.kernel),
        id(layer.second.bias)], _moved(hook, "the weights are not in order")
    assert old not in private_hooks.all_sublayers(layer), _moved(
        hook, "the old sublayer is still tracked")
    x = np.ones((1, 4), "float32")
    np.testing.assert_allclose(layer(x), layer.second(new(x)))
