"""Training a Mixture-of-Experts model with your own loop and tf.GradientTape.

``model.fit`` adds the MoE layer's balancing loss for you. In your own loop
you add it yourself: after ``model(x, training=True)``, ``model.losses``
holds the loss each MoE layer added in that call
(``loss_coef * (CV^2(importance) + CV^2(load))``), and the training loss is

    loss = task loss + sum(model.losses)

The same step runs on one device or data-parallel under
``tf.distribute.MirroredStrategy`` (``--replicas N``). Under a strategy each
replica computes its share of the loss, and the gradients are summed over
replicas, so

- the task loss is averaged over the *global* batch with
  ``tf.nn.compute_average_loss(per_example, global_batch_size=...)``, and
- the balancing loss, already computed on the global batch (the layer sums
  importance and load over the replicas), is divided by the number of
  replicas with ``tf.nn.scale_regularization_loss``.

On one device (the default strategy) both reduce to the plain mean and sum.
The task is the piecewise-linear regression of ``quickstart.py`` (synthetic,
no download, fixed seeds). The script prints, per epoch, the task loss, the
balancing loss and the layer's routing metrics (read from the layer's own
metrics, ``moe.metrics``), then the test MSE next to predicting the mean.

Run it from the repository root::

    python examples/custom_training_loop.py                 # one device
    python examples/custom_training_loop.py --replicas 2    # MirroredStrategy
    python examples/custom_training_loop.py --quick         # a smoke test

``--replicas N`` uses N GPUs if there are that many, or else splits the CPU
into N logical devices.
"""

import argparse
import os
import sys

import numpy as np

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# Before TensorFlow loads: 3 also hides the CUDA/cuInit error lines it
# prints on machines without a GPU driver.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_moe  # noqa: E402

NUM_FEATURES = 16
NUM_REGIONS = 8


def make_data(num_samples, seed):
    """``(x, y)``: inputs around 8 centres, a different linear target in
    each region (the quickstart's task)."""
    task = np.random.default_rng(0)
    centres = task.normal(size=(NUM_REGIONS, NUM_FEATURES))
    centres *= 3.0 / np.linalg.norm(centres, axis=1, keepdims=True)
    weights = task.normal(size=(NUM_REGIONS, NUM_FEATURES)) / 4.0
    rng = np.random.default_rng(seed)
    x = centres[rng.integers(NUM_REGIONS, size=num_samples)]
    x = x + rng.normal(size=(num_samples, NUM_FEATURES))
    region = np.argmax(x @ centres.T, axis=1)
    y = np.sum(x * weights[region], axis=1, keepdims=True)
    return x.astype("float32"), y.astype("float32")


def make_strategy(replicas):
    """The default (single-device) strategy, or MirroredStrategy over
    ``replicas`` GPUs or logical CPUs. Call before TensorFlow runs ops."""
    if replicas == 1:
        return tf.distribute.get_strategy()
    gpus = tf.config.list_physical_devices("GPU")
    if len(gpus) >= replicas:
        devices = [f"/gpu:{i}" for i in range(replicas)]
    else:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
        devices = [f"/cpu:{i}" for i in range(replicas)]
    return tf.distribute.MirroredStrategy(devices)


def build_model(num_experts, k, seed):
    inputs = keras.Input((NUM_FEATURES,))
    moe = keras_moe.MixtureOfExperts(num_experts=num_experts, k=k,
                                     hidden_sizes=(32,), output_dim=32,
                                     seed=seed, name="moe")
    outputs = keras.layers.Dense(1, name="head")(moe(inputs))
    return keras.Model(inputs, outputs), moe


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="small data, one epoch (smoke test)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs (default 10, 1 with --quick)")
    parser.add_argument("--replicas", type=int, default=1,
                        help="1: one device (default); N > 1: "
                             "MirroredStrategy over N devices")
    parser.add_argument("--batch-size", type=int, default=128,
                        help="global batch size (split over the replicas)")
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("-k", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.replicas < 1 or args.batch_size % args.replicas:
        parser.error("--replicas must be >= 1 and divide --batch-size")

    strategy = make_strategy(args.replicas)
    keras.utils.set_random_seed(args.seed)
    num_train, num_test = (1024, 512) if args.quick else (16384, 2048)
    epochs = args.epochs or (1 if args.quick else 10)
    x_train, y_train = make_data(num_train, seed=args.seed)
    x_test, y_test = make_data(num_test, seed=args.seed + 1000)
    global_batch = args.batch_size

    with strategy.scope():
        model, moe = build_model(args.num_experts, args.k, args.seed)
        optimizer = keras.optimizers.Adam(3e-3)
        # Create the optimizer's slots now, under the strategy, not inside
        # the first traced step.
        optimizer.build(model.trainable_variables)
    print(f"{strategy.num_replicas_in_sync} replica(s) "
          f"({type(strategy).__name__}), global batch {global_batch}")

    dataset = (tf.data.Dataset.from_tensor_slices((x_train, y_train))
               .shuffle(num_train, seed=args.seed)
               .batch(global_batch, drop_remainder=True))
    dataset = strategy.experimental_distribute_dataset(dataset)

    def replica_step(x, y):
        with tf.GradientTape() as tape:
            predictions = model(x, training=True)
            per_example = tf.reduce_mean(tf.square(y - predictions), axis=-1)
            task_loss = tf.nn.compute_average_loss(
                per_example, global_batch_size=global_batch)
            # The MoE layer's balancing loss from this call (one per layer).
            balance_loss = tf.nn.scale_regularization_loss(
                tf.add_n(model.losses))
            loss = task_loss + balance_loss
        variables = model.trainable_variables
        optimizer.apply_gradients(zip(tape.gradient(loss, variables),
                                      variables))
        return task_loss, balance_loss

    @tf.function
    def train_step(x, y):
        task_loss, balance_loss = strategy.run(replica_step, args=(x, y))
        # Each replica returned its share: the sums are the global values.
        return (strategy.reduce("SUM", task_loss, axis=None),
                strategy.reduce("SUM", balance_loss, axis=None))

    for epoch in range(1, epochs + 1):
        for metric in moe.metrics:
            metric.reset_state()
        task_sum = balance_sum = 0.0
        steps = 0
        for x, y in dataset:
            task_loss, balance_loss = train_step(x, y)
            task_sum += float(task_loss)
            balance_sum += float(balance_loss)
            steps += 1
        routing = {metric.name: float(metric.result())
                   for metric in moe.metrics}
        # The layer's own `moe_aux_loss` metric is the balancing loss of
        # the global batch: the same number as the loss the loop added.
        print(f"epoch {epoch}: task loss {task_sum / steps:.4f}, "
              f"balancing loss {balance_sum / steps:.6f} "
              f"(layer metric moe_aux_loss {routing['moe_aux_loss']:.6f}), "
              f"CV^2(importance) {routing['moe_importance_cv2']:.4f}, "
              f"CV^2(load) {routing['moe_load_cv2']:.4f}, "
              f"max/mean load {routing['moe_max_overload']:.3f}")

    predictions = model.predict(x_test, batch_size=512, verbose=0)
    test_mse = float(np.mean((predictions - y_test) ** 2))
    print(f"test MSE: {test_mse:.4f} (predicting the mean: "
          f"{float(np.var(y_test)):.4f})")
    load = moe.last_load.numpy()
    print("load of the last training batch (global): "
          + " ".join(f"{v:.1f}" for v in load)
          + f"; sum {float(load.sum()):.1f}, about k * global batch = "
          f"{args.k * global_batch} (the smooth estimate while noisy)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
