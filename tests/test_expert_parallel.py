"""Experts sharded over the replicas of a MirroredStrategy
(`MixtureOfExperts(expert_parallel=True)`, `ExpertParallelOptimizer`) on 2
and 4 logical CPUs: the all-to-all, training steps equal to the replicated
layer's on one device, where the bytes live, saving and loading across
replica counts, export, and the refusals."""

import contextlib
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_moe
from keras_moe import all_to_all
from keras_moe import ExpertParallelOptimizer
from numerics import FORWARD, GRADIENT, STEP, assert_close
from strategies import mirrored

D, E = 6, 4
# A bug in a collective fails its test within this, instead of hanging CI.
all_to_all.TIMEOUT_SECONDS = 60.0


def _data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, D)).astype("float32"),
            rng.normal(size=(n, D)).astype("float32"))


def _model(expert_parallel=True, capacity_factor=float(E), **kwargs):
    keras.utils.set_random_seed(3)
    return keras.Sequential([
        keras.Input((D,)),
        keras_moe.MixtureOfExperts(
            E, k=2, hidden_sizes=(5,), noisy_gating=False,
            dispatch="capacity", capacity_factor=capacity_factor,
            eval_capacity_factor=float(E),
            gate_initializer="random_normal",
            expert_parallel=expert_parallel, name="moe", **kwargs),
    ])


_OPTIMIZERS = {
    "sgd": lambda: keras.optimizers.SGD(0.1, momentum=0.5),
    "adam": lambda: keras.optimizers.Adam(0.01),
    "adamw": lambda: keras.optimizers.AdamW(0.01, weight_decay=0.1),
}


def _weights(model):
    moe = model.get_layer("moe")
    return ([moe.gating.gate_kernel.numpy()]
            + [k.numpy() for k in moe.experts.kernels])


def _trained(model, optimizer, epochs=1, batch_size=16, **fit_kwargs):
    # In the strategy's scope the model was made in (Keras's optimizers
    # belong to one strategy).
    with model.distribute_strategy.scope():
        model.compile(
            optimizer=ExpertParallelOptimizer(_OPTIMIZERS[optimizer]()),
            loss="mse", **fit_kwargs)
    x, y = _data()
    model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=False,
              verbose=0)
    return _weights(model)


def _assert_same_steps(got, want, initial, steps):
    for i, (a, b, start) in enumerate(zip(got, want, initial)):
        assert_close(a - start, b - start, STEP * steps, what=f"weight {i}")


@pytest.mark.parametrize("num_replicas", [2, 4])
@pytest.mark.parametrize("graph", [True, False])
def test_all_to_all_sends_slice_r_to_replica_r_and_back_in_the_gradient(
        num_replicas, graph):
    strategy = mirrored(num_replicas)
    with strategy.scope():
        scale = tf.Variable(1.5)
    rng = np.random.default_rng(1)
    sent = [rng.normal(size=(num_replicas, 3)).astype("float32")
            for _ in range(num_replicas)]
    weights = np.arange(3, dtype="float32")

    def step(x):
        with tf.GradientTape() as tape:
            received = all_to_all.all_to_all(x * scale)
            back = all_to_all.all_to_all(received ** 2)
            loss = tf.reduce_sum(back * weights)
        return received, tape.gradient(loss, scale)

    def run(values):
        return strategy.run(step, args=(values,))

    values = strategy.experimental_distribute_values_from_function(
        lambda context: tf.constant(sent[context.replica_id_in_sync_group]))
    received, grads = (tf.function(run) if graph else run)(values)
    received = strategy.experimental_local_results(received)
    for r in range(num_replicas):
        want = np.stack([sent[s][r] * 1.5 for s in range(num_replicas)])
        assert_close(received[r], want, FORWARD, what=f"replica {r}")
    # loss = sum over replicas of sum((1.5 x)^2 * weights): d/dscale.
    want_grad = sum((2 * 1.5 * x**2 * weights).sum() for x in sent)
    assert_close(sum(float(g) for g in strategy.experimental_local_results(
        grads)), want_grad, GRADIENT)


# Adam's update through AdamW (its subclass, plus the decay the wrapper
# applies itself), and SGD with momentum.
@pytest.mark.parametrize("num_replicas, optimizer",
                         [(4, "sgd"), (2, "adamw")])
def test_fit_equals_the_replicated_layer_on_one_device(num_replicas,
                                                       optimizer):
    # No token dropped (capacity E * tokens * k / E), no noise.
    reference = _model(expert_parallel=False)
    initial = _weights(reference)
    want = _trained(reference, optimizer, epochs=2)
    strategy = mirrored(num_replicas)
    with strategy.scope():
        model = _model()
    np.testing.assert_array_equal(_weights(model)[1], initial[1])
    got = _trained(model, optimizer, epochs=2)
    _assert_same_steps(got, want, initial, steps=4)


def test_each_device_holds_its_share_of_the_experts_and_their_slots():
    num_replicas = 4
    strategy = mirrored(num_replicas)
    with strategy.scope():
        model = _model()
        model.compile(
            optimizer=ExpertParallelOptimizer(keras.optimizers.Adam()),
            loss="mse")
        model.optimizer.build(model.trainable_variables)
    experts = model.get_layer("moe").experts
    expert_bytes = sum(k.shape.num_elements() for k in experts.kernels) * 4
    per_device = {}
    for variable in experts.weights + model.optimizer.variables:
        if "shard" not in variable.path:
            continue
        device = tf.DeviceSpec.from_string(variable.value.device)
        key = (device.device_type, device.device_index)
        per_device[key] = per_device.get(key, 0) + (
            variable.shape.num_elements() * 4)
    assert sorted(per_device) == [("CPU", i) for i in range(num_replicas)]
    # Kernels and Adam's two slots: three times 1/R of the expert bytes.
    assert set(per_device.values()) == {3 * expert_bytes // num_replicas}
    # The gate stays mirrored.
    gate = model.get_layer("moe").gating.gate_kernel.value
    assert len(strategy.experimental_local_results(gate)) == num_replicas


def test_drops_are_those_of_the_replicated_layer_under_the_same_strategy():
    # Capacity per expert and per sending replica, as each replica of the
    # replicated layer counts it for its own tokens.
    strategy = mirrored(2)
    with strategy.scope():
        reference = _model(expert_parallel=False, capacity_factor=0.5)
        initial = _weights(reference)
        want = _trained(reference, "adam")
        model = _model(capacity_factor=0.5)
        got = _trained(model, "adam")
    _assert_same_steps(got, want, initial, steps=2)
    x, _ = _data()
    _, routing = model.get_layer("moe")(x[:16], training=True,
                                        return_routing=True)
    assert float(routing["dropped_fraction"]) > 0


def test_evaluate_and_predict_with_a_ragged_last_batch():
    x, y = _data(n=10)
    reference = _model(expert_parallel=False)
    strategy = mirrored(2)
    with strategy.scope():
        model = _model()
        model.compile(optimizer=ExpertParallelOptimizer(
            keras.optimizers.SGD()), loss="mse")
    # Batches of 4, 4 and 2 rows: the last gives each replica 1 row.
    assert_close(model.predict(x, batch_size=4, verbose=0),
                 reference.predict(x, batch_size=4, verbose=0), FORWARD)
    reference.compile(loss="mse")
    assert_close(model.evaluate(x, y, batch_size=4, verbose=0),
                 reference.evaluate(x, y, batch_size=4, verbose=0), FORWARD)


def test_saved_at_4_replicas_loads_at_2_at_1_and_without_a_strategy(
        tmp_path):
    x, _ = _data(n=8)
    with mirrored(4).scope():
        model = _model()
        _trained(model, "adam")
    want = _weights(model)
    path = str(tmp_path / "model.keras")
    model.save(path)
    weights_path = str(tmp_path / "model.weights.h5")
    model.save_weights(weights_path)
    checkpoint = tf.train.Checkpoint(
        model=model, optimizer=model.optimizer).write(str(tmp_path / "ckpt"))
    with mirrored(2).scope():
        loaded = keras.models.load_model(path)
    with mirrored(1).scope():
        from_weights = _model()
        from_weights.load_weights(weights_path)
    restored = []
    for strategy in (mirrored(2), None):
        with strategy.scope() if strategy else contextlib.nullcontext():
            from_checkpoint = _model()
            optimizer = ExpertParallelOptimizer(_OPTIMIZERS["adam"]())
            # Built before the restore, so that its slots exist.
            optimizer.build(from_checkpoint.trainable_variables)
        tf.train.Checkpoint(model=from_checkpoint, optimizer=optimizer).read(
            checkpoint).assert_existing_objects_matched()
        from_checkpoint.optimizer = optimizer
        restored.append(from_checkpoint)
    for other in (loaded, from_weights, *restored):
        for a, b in zip(_weights(other), want):
            np.testing.assert_array_equal(a, b)
    # The optimizer's state too: the shards' slots saved as whole slots,
    # loaded into 2 shards each (or 1 whole slot).
    assert loaded.get_layer("moe").experts.num_shards == 2
    saved_slots = [v for v in model.optimizer.variables
                   if "experts_kernel_0" in v.path]
    assert len(saved_slots) == 8
    for other, count in ((loaded, 4), (restored[0], 4), (restored[1], 2)):
        slots = [v for v in other.optimizer.variables
                 if "experts_kernel_0" in v.path
                 or "experts/kernel_0" in v.path]
        assert len(slots) == count, [v.path for v in slots]
        for name in ("momentum", "velocity"):
            np.testing.assert_array_equal(
                np.concatenate([v.numpy() for v in slots
                                if v.path.endswith(name)]),
                np.concatenate([v.numpy() for v in saved_slots
                                if v.path.endswith(name)]))
    assert_close(loaded.predict(x, verbose=0), model.predict(x, verbose=0),
                 FORWARD)


def test_export_serves_without_a_strategy(tmp_path):
    x, _ = _data(n=8)
    with mirrored(2).scope():
        model = _model()
        _trained(model, "sgd")
        want = model.predict(x, verbose=0)
        model.export(str(tmp_path / "served"), verbose=False)
    served = tf.saved_model.load(str(tmp_path / "served"))
    assert_close(served.serve(tf.constant(x)), want, FORWARD)


def test_run_eagerly_trains_like_the_compiled_step():
    strategy = mirrored(2)
    with strategy.scope():
        compiled = _model()
        want = _trained(compiled, "adam")
        eager = _model()
        initial = _weights(eager)
        got = _trained(eager, "adam", run_eagerly=True)
    _assert_same_steps(got, want, initial, steps=2)


def test_mixed_float16_composes_with_the_loss_scale_optimizer():
    keras.config.set_dtype_policy("mixed_float16")
    with mirrored(2).scope():
        model = _model()
        model.compile(optimizer=ExpertParallelOptimizer(
            keras.optimizers.Adam(0.01)), loss="mse")
        assert isinstance(model.optimizer,
                          keras.optimizers.LossScaleOptimizer)
        before = _weights(model)
        x, y = _data()
        history = model.fit(x, y, batch_size=16, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    moved = [np.abs(a - b).max() for a, b in zip(_weights(model), before)]
    assert min(moved) > 0, moved


def test_bad_configurations_are_refused():
    with pytest.raises(ValueError, match="dispatch='sparse'"):
        keras_moe.MixtureOfExperts(E, expert_parallel=True)
    with mirrored(4).scope():
        with pytest.raises(ValueError, match="num_experts=6, replicas=4"):
            keras_moe.MixtureOfExperts(
                6, dispatch="capacity", expert_parallel=True).build((None, D))
    central = tf.distribute.experimental.CentralStorageStrategy(
        ["/cpu:0", "/cpu:1"])
    with central.scope():
        with pytest.raises(ValueError, match="CentralStorageStrategy"):
            _model()
    for argument in ("clipnorm", "global_clipnorm", "clipvalue"):
        with pytest.raises(ValueError, match=f"{argument}=1.0"):
            ExpertParallelOptimizer(keras.optimizers.SGD(**{argument: 1.0}))
    with pytest.raises(ValueError, match="LossScaleOptimizer"):
        ExpertParallelOptimizer(keras.optimizers.LossScaleOptimizer(
            keras.optimizers.SGD()))
    with pytest.raises(TypeError, match="optimizer="):
        ExpertParallelOptimizer("adam")


def test_training_without_the_wrapper_is_refused():
    with mirrored(2).scope():
        model = _model()
        model.compile(optimizer="adam", loss="mse")
    x, y = _data()
    with pytest.raises(ValueError, match="ExpertParallelOptimizer"):
        model.fit(x, y, batch_size=16, verbose=0)


def test_jit_compile_falls_back_to_the_plain_graph_with_a_warning():
    # The layer says it does not compile (`supports_jit = False`): Keras
    # warns and trains without XLA.
    with mirrored(2).scope():
        model = _model()
        with pytest.warns(UserWarning, match="jit_compile"):
            model.compile(optimizer=ExpertParallelOptimizer(
                keras.optimizers.SGD()), loss="mse", jit_compile=True)
    assert model.jit_compile is False
    x, y = _data()
    history = model.fit(x, y, batch_size=16, verbose=0)
    assert np.isfinite(history.history["loss"]).all()


def test_without_a_strategy_it_is_the_ordinary_layer():
    model = _model()
    reference = _model(expert_parallel=False)
    moe = model.get_layer("moe")
    assert moe.experts.num_shards == 1
    assert not moe.supports_jit
    assert moe.get_config()["expert_parallel"] is True
    x, _ = _data(n=8)
    np.testing.assert_array_equal(model.predict(x, verbose=0),
                                  reference.predict(x, verbose=0))


def test_backup_and_restore_resumes_at_another_replica_count(tmp_path):
    x, y = _data()
    backup = str(tmp_path / "backup")
    with mirrored(2).scope():
        model = _model()
        model.compile(optimizer=ExpertParallelOptimizer(
            keras.optimizers.Adam(0.01)), loss="mse")
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[
        keras.callbacks.BackupAndRestore(backup, delete_checkpoint=False)])
    want = _weights(model)
    with mirrored(4).scope():
        resumed = _model()
        # Another learning rate: had it trained, its weights would differ.
        resumed.compile(optimizer=ExpertParallelOptimizer(
            keras.optimizers.Adam(0.5)), loss="mse")
    # The backup says epoch 1 of 1 is done: restored, nothing trained.
    resumed.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[
        keras.callbacks.BackupAndRestore(backup, delete_checkpoint=False)])
    for a, b in zip(_weights(resumed), want):
        np.testing.assert_array_equal(a, b)


def test_without_sharded_experts_the_wrapper_is_the_wrapped_optimizer():
    x, y = _data()
    weights = []
    for wrap in (False, True):
        model = _model(expert_parallel=False)
        optimizer = keras.optimizers.Adam(0.01)
        model.compile(optimizer=ExpertParallelOptimizer(optimizer)
                      if wrap else optimizer, loss="mse")
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
        weights.append(_weights(model))
        assert int(optimizer.iterations) == 2
    for a, b in zip(*weights):
        np.testing.assert_array_equal(a, b)
    config = ExpertParallelOptimizer(keras.optimizers.SGD(0.5)).get_config()
    clone = ExpertParallelOptimizer.from_config(config)
    assert isinstance(clone.inner_optimizer, keras.optimizers.SGD)
    assert float(clone.learning_rate) == 0.5


def test_apply_before_build_needs_the_variables():
    optimizer = ExpertParallelOptimizer(keras.optimizers.SGD())
    with pytest.raises(ValueError, match="trainable_variables"):
        optimizer.apply([tf.ones(())])


# The hierarchical layer: whole groups on each replica.
G, EG = 4, 2


def _hierarchical_model(expert_parallel=True, capacity_factor=float(G)):
    keras.utils.set_random_seed(3)
    return keras.Sequential([
        keras.Input((D,)),
        keras_moe.HierarchicalMixtureOfExperts(
            G, EG, k=2, group_k=2, hidden_sizes=(5,), noisy_gating=False,
            dispatch="capacity", capacity_factor=capacity_factor,
            eval_capacity_factor=float(G),
            gate_initializer="random_normal",
            expert_parallel=expert_parallel, name="moe"),
    ])


def _hierarchical_weights(model):
    moe = model.get_layer("moe")
    return ([moe.primary_gating.gate_kernel.numpy(),
             moe.secondary_gating.gate_kernel.numpy()]
            + [k.numpy() for k in moe.experts.kernels])


def _hierarchical_trained(model, batch_size=16):
    with model.distribute_strategy.scope():
        model.compile(
            optimizer=ExpertParallelOptimizer(keras.optimizers.Adam(0.01)),
            loss="mse")
    x, y = _data()
    history = model.fit(x, y, batch_size=batch_size, shuffle=False,
                        verbose=0)
    return _hierarchical_weights(model), history.history


# 4 replicas repeat 2 at twice the tracing time: slow.
@pytest.mark.parametrize("num_replicas", [
    2, pytest.param(4, marks=pytest.mark.slow)])
def test_hierarchical_groups_live_on_their_replica_and_train_as_one_device(
        num_replicas, tmp_path):
    # No (token, group) choice dropped, no noise: the replicated layer on
    # one device.
    reference = _hierarchical_model(expert_parallel=False)
    initial = _hierarchical_weights(reference)
    want, _ = _hierarchical_trained(reference)
    strategy = mirrored(num_replicas)
    with strategy.scope():
        model = _hierarchical_model()
    experts = model.get_layer("moe").experts
    per_replica = G * EG // num_replicas
    for kernel in experts.kernels:
        # Replica r holds groups [r G / R, (r + 1) G / R): their experts.
        assert [tf.DeviceSpec.from_string(s.value.device).device_index
                for s in kernel.shards] == list(range(num_replicas))
        assert {s.shape[0] for s in kernel.shards} == {per_replica}
    got, history = _hierarchical_trained(model)
    _assert_same_steps(got, want, initial, steps=2)
    assert history["moe_dropped_fraction"] == [0.0]
    # Saved whole: loads with no strategy and predicts the same.
    path = str(tmp_path / "sharded.weights.h5")
    model.save_weights(path)
    plain = _hierarchical_model(expert_parallel=False)
    plain.load_weights(path)
    # (A ragged last batch: the flat layer's test; the slot count is the
    # same code.)
    x, _ = _data(n=8)
    assert_close(plain.predict(x, verbose=0),
                 model.predict(x, batch_size=8, verbose=0), FORWARD)


def test_hierarchical_drops_are_those_of_the_replicated_layer():
    # Slots per group and per sending replica, as each replica of the
    # replicated layer counts them for its own tokens.
    strategy = mirrored(2)
    with strategy.scope():
        reference = _hierarchical_model(expert_parallel=False,
                                        capacity_factor=0.5)
        initial = _hierarchical_weights(reference)
        want, want_history = _hierarchical_trained(reference)
        model = _hierarchical_model(capacity_factor=0.5)
        got, history = _hierarchical_trained(model)
    _assert_same_steps(got, want, initial, steps=2)
    assert history["moe_dropped_fraction"][0] > 0
    assert_close(history["moe_dropped_fraction"],
                 want_history["moe_dropped_fraction"], FORWARD)
    assert_close(history["moe_load_cv2"], want_history["moe_load_cv2"],
                 FORWARD)


def test_hierarchical_bad_configurations_are_refused():
    with pytest.raises(ValueError, match="dispatch='sparse'"):
        keras_moe.HierarchicalMixtureOfExperts(G, EG, expert_parallel=True)
    with mirrored(4).scope():
        with pytest.raises(ValueError, match="num_groups=2, replicas=4"):
            keras_moe.HierarchicalMixtureOfExperts(
                2, 4, dispatch="capacity",
                expert_parallel=True).build((None, D))
    with mirrored(2).scope():
        model = _hierarchical_model()
        model.compile(optimizer="adam", loss="mse")
    x, y = _data()
    with pytest.raises(ValueError, match="ExpertParallelOptimizer"):
        model.fit(x, y, batch_size=16, verbose=0)
