"""What the worker scripts in this folder share: TensorFlow set-up, the model,
the data and the custom training step.

Imported by the worker scripts (run as `python tests/workers/<script>.py`, so
this folder is on `sys.path`), never by pytest itself. Everything here is
deterministic: fixed initial weights from a seeded NumPy generator, fixed
global batches, gating noise off, no jit.
"""

import json
import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["KERAS_BACKEND"] = "tensorflow"

import numpy as np  # noqa: E402

# Sizes of the test model and data.
INPUT_DIM = 6
NUM_EXPERTS = 4
K = 2
HIDDEN_SIZES = (8,)
OUTPUT_DIM = 3
GLOBAL_BATCH = 16
LOSS_COEF = 0.1  # large enough for the balancing gradient to matter
LEARNING_RATE = 0.05
MOMENTUM = 0.9
WEIGHT_SEED = 20170123
DATA_SEED = 4242


def setup_tensorflow(logical_cpus=None, inter_op_threads=None):
    """Configures TensorFlow before it touches a device; returns the module.

    `inter_op_threads`: collective ops over gRPC need several inter-op
    threads; on a 2-core machine the default pool (one thread a core) can
    deadlock a multi-worker all-reduce. `logical_cpus`: split the CPU into
    that many logical devices (for `MirroredStrategy` in one process).
    """
    import tensorflow as tf

    if inter_op_threads:
        tf.config.threading.set_inter_op_parallelism_threads(inter_op_threads)
    if logical_cpus:
        tf.config.set_logical_device_configuration(
            tf.config.list_physical_devices("CPU")[0],
            [tf.config.LogicalDeviceConfiguration()] * logical_cpus,
        )
    return tf


def build_model():
    """Input -> MixtureOfExperts (noise off) -> Dense, fixed weights.

    Build it inside the strategy's scope. Every process gets the same
    weights: they come from a seeded NumPy generator, in the order of
    `model.get_weights()`.
    """
    import keras

    import keras_moe

    inputs = keras.Input((INPUT_DIM,))
    hidden = keras_moe.MixtureOfExperts(
        NUM_EXPERTS,
        k=K,
        hidden_sizes=HIDDEN_SIZES,
        noisy_gating=False,
        loss_coef=LOSS_COEF,
        name="moe",
    )(inputs)
    outputs = keras.layers.Dense(OUTPUT_DIM, name="head")(hidden)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(WEIGHT_SEED)
    # Non-zero gating kernels, so that routing depends on the input and the
    # gates get gradients.
    model.set_weights(
        [rng.normal(0.0, 0.5, w.shape).astype("float32")
         for w in model.get_weights()]
    )
    return model


def make_optimizer():
    import keras

    return keras.optimizers.SGD(LEARNING_RATE, momentum=MOMENTUM)


def build_expert_parallel_model(expert_parallel=True):
    """Input -> MixtureOfExperts (capacity dispatch with room for every
    token, noise off, experts sharded over the replicas when built under a
    strategy with `expert_parallel`) -> Dense. Seeded initializers (a
    sharded kernel's shards are not `get_weights()` entries of the whole
    kernel), so every process starts from the same whole weights."""
    import keras

    import keras_moe

    inputs = keras.Input((INPUT_DIM,))
    hidden = keras_moe.MixtureOfExperts(
        NUM_EXPERTS,
        k=K,
        hidden_sizes=HIDDEN_SIZES,
        noisy_gating=False,
        loss_coef=LOSS_COEF,
        dispatch="capacity",
        capacity_factor=float(NUM_EXPERTS),
        gate_initializer=keras.initializers.RandomNormal(0.0, 0.5, seed=1),
        expert_initializer=keras.initializers.GlorotUniform(seed=2),
        expert_parallel=expert_parallel,
        name="moe",
    )(inputs)
    outputs = keras.layers.Dense(
        OUTPUT_DIM, kernel_initializer=keras.initializers.GlorotUniform(
            seed=3), name="head")(hidden)
    return keras.Model(inputs, outputs)


def make_expert_parallel_optimizer():
    import keras

    import keras_moe

    return keras_moe.ExpertParallelOptimizer(make_optimizer())


def whole_weights(model):
    """`(names, weights)`: the model's weights with each sharded expert
    kernel read whole (all workers must call it together, in the
    strategy's scope), in the order of the replicated model's weights."""
    names, weights = [], []
    for layer in model.layers:
        experts = getattr(layer, "experts", None)
        for variable in layer.weights:
            if "_shard_" in variable.path:
                continue
            names.append(str(variable.path))
            weights.append(variable.numpy())
        if experts is not None and experts.num_shards > 1:
            # Sharded kernels after the layer's other weights; the
            # replicated model lists the experts' kernels last too.
            for index, kernel in enumerate(experts.kernels):
                names.append(f"{layer.name}/experts/kernel_{index}")
                weights.append(kernel.numpy())
    return names, weights


def global_batches(num_steps):
    """`num_steps` global batches `(x, y)`, the same in every process."""
    rng = np.random.default_rng(DATA_SEED)
    x = rng.normal(size=(num_steps, GLOBAL_BATCH, INPUT_DIM)).astype("float32")
    y = rng.normal(size=(num_steps, GLOBAL_BATCH, OUTPUT_DIM))
    y = y.astype("float32")
    return x, y


def dataset_arrays(num_batches):
    """The same data flattened to `(num_batches * GLOBAL_BATCH, ...)` for
    `model.fit(..., batch_size=GLOBAL_BATCH, shuffle=False)`."""
    x, y = global_batches(num_batches)
    return x.reshape(-1, INPUT_DIM), y.reshape(-1, OUTPUT_DIM)


def make_train_step(strategy, model, optimizer):
    """A `tf.function` running one custom-loop step on a global batch.

    The per-replica loss is the documented custom-loop scaling:
    `compute_average_loss(per_example, global_batch_size)` plus
    `scale_regularization_loss(sum of model.losses)`. The MoE balancing loss
    is computed from statistics already summed over replicas, so every
    replica holds the global value; dividing it by the number of replicas
    and summing the gradients over replicas counts it once.

    Each replica reads its contiguous slice of the global batch: replica r
    of R gets rows `[r * B/R, (r + 1) * B/R)` (through
    `strategy.experimental_distribute_values_from_function`, by the replica
    id in sync, which under `MultiWorkerMirroredStrategy` with one CPU
    replica a worker is the worker's task index). `strategy=None`: no
    strategy at all, the same step on the whole global batch (the reference
    run).
    """
    import tensorflow as tf

    num_replicas = 1 if strategy is None else strategy.num_replicas_in_sync
    per_replica = GLOBAL_BATCH // num_replicas

    def step_fn(x, y):
        with tf.GradientTape() as tape:
            predictions = model(x, training=True)
            per_example = tf.reduce_mean(tf.square(y - predictions), axis=-1)
            loss = tf.nn.compute_average_loss(
                per_example, global_batch_size=GLOBAL_BATCH
            )
            loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    if strategy is None:
        return tf.function(step_fn)

    @tf.function
    def distributed_step(x, y):
        losses = strategy.run(step_fn, args=(x, y))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, losses, axis=None)

    def train_step(x_global, y_global):
        def shard(array):
            def value_fn(context):
                start = context.replica_id_in_sync_group * per_replica
                return tf.constant(array[start:start + per_replica])

            return strategy.experimental_distribute_values_from_function(
                value_fn
            )

        return distributed_step(shard(x_global), shard(y_global))

    return train_step


def save_weights_npz(path, model, **extra):
    """Writes `model.get_weights()` as `w0, w1, ...`, their variable paths
    as `names`, plus `extra` arrays, through a temporary file so that a
    reader never sees half a file."""
    arrays = {f"w{i}": w for i, w in enumerate(model.get_weights())}
    arrays["names"] = np.array([v.path for v in model.weights])
    arrays.update({k: np.asarray(v) for k, v in extra.items()})
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def write_json(path, payload):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f)
    os.replace(tmp, path)


def die():
    """Kills this process the hard way (no cleanup, no atexit, no flush of
    TensorFlow state): what a preempted or crashed machine looks like."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def exit_now(code=0):
    """Exits at once, skipping the interpreter's and TensorFlow's teardown
    (seconds on a loaded 2-core machine). Call it once every output file is
    closed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def task_from_tf_config():
    """`(task_index, num_workers)` from TF_CONFIG; `(0, 1)` without it."""
    config = json.loads(os.environ.get("TF_CONFIG", "{}") or "{}")
    if not config:
        return 0, 1
    return config["task"]["index"], len(config["cluster"]["worker"])


def make_multi_worker_strategy(tf):
    """`MultiWorkerMirroredStrategy` from TF_CONFIG: one CPU replica a
    worker, ring all-reduce over gRPC."""
    implementation = tf.distribute.experimental.CommunicationImplementation
    return tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=tf.distribute.experimental.CommunicationOptions(
            implementation=implementation.RING
        )
    )


def make_mirrored_strategy(tf, num_devices=2):
    """`MirroredStrategy` over the first `num_devices` logical CPUs (split
    them first: `setup_tensorflow(logical_cpus=...)`)."""
    return tf.distribute.MirroredStrategy(
        [f"/cpu:{i}" for i in range(num_devices)]
    )


def fit_model(strategy, epochs, steps_per_epoch, callbacks=()):
    """`model.fit` of the common test model under `strategy`: a fixed
    dataset of `steps_per_epoch` global batches, `shuffle=False`, noise off,
    no jit. Returns the model."""
    with strategy.scope():
        model = build_model()
        model.compile(make_optimizer(), "mse", jit_compile=False)
    x, y = dataset_arrays(steps_per_epoch)
    model.fit(
        x, y, batch_size=GLOBAL_BATCH, epochs=epochs, shuffle=False,
        verbose=0, callbacks=list(callbacks),
    )
    return model


def run_custom_loop(num_steps, build=build_model, make=make_optimizer):
    """The reference: `num_steps` custom-loop steps in this process with no
    strategy, each on the whole global batch, on the CPU. Returns the
    model (made by `build()`, trained by `make()`, which is its
    `.optimizer`)."""
    import tensorflow as tf

    # On the CPU, as the workers: a GPU would compute (TF32 matmuls) to
    # another precision.
    with tf.device("/cpu:0"):
        model = build()
        optimizer = make()
        optimizer.build(model.trainable_variables)
        train_step = make_train_step(None, model, optimizer)
        x, y = global_batches(num_steps)
        for s in range(num_steps):
            train_step(x[s], y[s])
    model.optimizer = optimizer
    return model


def run_fit_reference(epochs, steps_per_epoch, strategy):
    """The reference for the BackupAndRestore tests: the same `fit` under
    `strategy` (a `MirroredStrategy` over `/cpu:0` and `/cpu:1`),
    uninterrupted and without any callback. Returns the model."""
    return fit_model(strategy, epochs, steps_per_epoch)
