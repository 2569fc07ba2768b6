"""A small sharded-vocabulary model trained with ParameterServerStrategy
(tests/test_parameter_server.py).

As a script this is the chief (coordinator) of a local cluster whose workers
and parameter servers run elsewhere (tests/workers/ps_server.py):

    python ps_train.py CLUSTER_JSON OUT.npz DEADLINE_S

It waits until every server of the cluster accepts connections, builds the
model under `tf.distribute.ParameterServerStrategy` (its variables on the
parameter servers), trains STEPS steps with a custom loop
through `tf.distribute.coordinator.ClusterCoordinator`, one step at a time
(each `schedule` is fetched before the next, so the steps run in order even
though any worker may take any step), and writes the losses, the final
weights and the devices of the variables to OUT.npz.

As a module (the test imports it) it gives the same model, data and step
for the single-process reference run.

The model: ids [BATCH, SEQ] -> ShardedEmbedding(VOCAB, WIDTH, 2 shards) ->
mean over SEQ -> Dense(WIDTH, tanh) -> SampledSoftmaxLoss(VOCAB, 2 shards)
with a fixed draw of sampled classes per step (one of them a target) and
per-example weights; SGD.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402

VOCAB = 13  # not a multiple of the shard count
WIDTH = 4
SEQ = 3
BATCH = 6
NUM_SAMPLED = 5
STEPS = 4
LEARNING_RATE = 0.5


def make_data():
    """Inputs, fixed sampler draws and initial weights (numpy)."""
    rng = np.random.RandomState(20170123)
    f32 = lambda a: np.asarray(a, np.float32)
    ids = rng.randint(0, VOCAB, size=(STEPS, BATCH, SEQ)).astype(np.int32)
    ids[:, 0, :] = ids[:, 0, :1]  # repeated ids within a row
    targets = rng.randint(0, VOCAB, size=(STEPS, BATCH)).astype(np.int32)
    sampled = np.stack(
        [rng.choice(VOCAB, NUM_SAMPLED, replace=False) for _ in range(STEPS)]
    ).astype(np.int32)
    sampled[:, 0] = targets[:, 1]  # a sampled class equal to a target
    # Log-uniform expected counts, num_sampled * P(class).
    classes = np.arange(VOCAB, dtype=np.float64)
    q = NUM_SAMPLED * np.log((classes + 2) / (classes + 1)) / np.log(VOCAB + 1)
    return {
        "ids": ids,
        "targets": targets,
        "weights": f32(rng.uniform(0.5, 1.5, size=(STEPS, BATCH))),
        "sampled": sampled,
        "true_expected": f32(q[targets]),
        "sampled_expected": f32(q[sampled]),
        "input_table": f32(0.5 * rng.normal(size=(VOCAB, WIDTH))),
        "dense_kernel": f32(0.5 * rng.normal(size=(WIDTH, WIDTH))),
        "dense_bias": f32(0.1 * rng.normal(size=(WIDTH,))),
        "class_table": f32(0.5 * rng.normal(size=(VOCAB, WIDTH))),
    }


class Model:
    """The layers of the model, built and set to the data's weights."""

    def __init__(self, data):
        import keras

        from keras_moe.embedding import ShardedEmbedding
        from keras_moe.sampled_softmax import SampledSoftmaxLoss

        self.embedding = ShardedEmbedding(
            VOCAB, WIDTH, num_shards=2, name="input_embedding"
        )
        self.dense = keras.layers.Dense(WIDTH, activation="tanh", name="dense")
        self.loss = SampledSoftmaxLoss(
            VOCAB, NUM_SAMPLED, num_shards=2, name="sampled_softmax"
        )
        self.embedding.build()
        self.dense.build((None, WIDTH))
        self.loss.build((None, WIDTH))
        self.embedding.set_full_table(data["input_table"])
        self.dense.kernel.assign(data["dense_kernel"])
        self.dense.bias.assign(data["dense_bias"])
        self.loss.embedding.set_full_table(data["class_table"])

    @property
    def trainable_variables(self):
        return (
            self.embedding.trainable_variables
            + self.dense.trainable_variables
            + self.loss.trainable_variables
        )

    def weights(self):
        """The weights as numpy, tables in id order."""
        return {
            "input_table": self.embedding.full_table().numpy(),
            "dense_kernel": self.dense.kernel.numpy(),
            "dense_bias": self.dense.bias.numpy(),
            "class_table": self.loss.embedding.full_table().numpy(),
        }

    def devices(self):
        return {
            "input_embedding": [s.value.device for s in self.embedding.shards],
            "class_embedding": [
                s.value.device for s in self.loss.embedding.shards
            ],
        }


def make_step(model, optimizer, data, run=None):
    """A `tf.function` step(step_index) -> mean weighted loss of the batch.

    `run(fn, args)` runs the replica step (`strategy.run` under a
    strategy); by default it is called directly."""
    import tensorflow as tf

    consts = {
        k: tf.constant(data[k])
        for k in ("ids", "targets", "weights", "sampled", "true_expected",
                  "sampled_expected")
    }
    variables = model.trainable_variables

    def replica_step(step):
        batch = {k: tf.gather(v, step) for k, v in consts.items()}
        with tf.GradientTape() as tape:
            h = tf.reduce_mean(model.embedding(batch["ids"]), axis=1)
            h = model.dense(h)
            per_example = model.loss(
                h,
                batch["targets"],
                training=True,
                sample_weight=batch["weights"],
                sampled_values=(
                    batch["sampled"],
                    batch["true_expected"],
                    batch["sampled_expected"],
                ),
            )
            loss = tf.reduce_sum(per_example) / BATCH
        grads = tape.gradient(loss, variables)
        optimizer.apply_gradients(zip(grads, variables))
        return loss

    @tf.function
    def step_fn(step):
        if run is None:
            return replica_step(step)
        return run(replica_step, (step,))

    return step_fn


def _watchdog(deadline_s):
    """Exits the process (code 3) after `deadline_s` seconds, or as soon as
    its parent is gone: a chief left behind would wait on the cluster
    forever."""
    import threading
    import time

    parent = os.getppid()
    end = time.monotonic() + deadline_s

    def watch():
        while time.monotonic() < end and os.getppid() == parent:
            time.sleep(0.5)
        print("watchdog: deadline passed or parent gone; exiting", flush=True)
        os._exit(3)

    threading.Thread(target=watch, daemon=True).start()


def _wait_for_servers(cluster, timeout_s=60.0):
    """Waits until every worker and parameter server accepts TCP
    connections (they may still be starting)."""
    import socket
    import time

    addresses = cluster["worker"] + cluster["ps"]
    end = time.monotonic() + timeout_s
    for address in addresses:
        host, port = address.rsplit(":", 1)
        while True:
            try:
                socket.create_connection((host, int(port)), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > end:
                    raise RuntimeError(f"server {address} never came up")
                time.sleep(0.2)


def main(argv):
    cluster_json, out_path, deadline_s = argv
    _watchdog(float(deadline_s))
    # Import while the servers start, then wait for them.
    import keras
    import tensorflow as tf

    import keras_moe.sampled_softmax  # noqa: F401

    tf.config.threading.set_inter_op_parallelism_threads(4)
    _wait_for_servers(json.loads(cluster_json))

    cluster = tf.train.ClusterSpec(json.loads(cluster_json))
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        cluster, task_type="chief", task_id=0, rpc_layer="grpc"
    )
    strategy = tf.distribute.ParameterServerStrategy(resolver)
    data = make_data()
    with strategy.scope():
        model = Model(data)
        optimizer = keras.optimizers.SGD(LEARNING_RATE)
        optimizer.build(model.trainable_variables)
    coordinator = tf.distribute.coordinator.ClusterCoordinator(strategy)
    step_fn = make_step(
        model, optimizer, data,
        run=lambda fn, args: strategy.run(fn, args=args),
    )
    losses = []
    for step in range(STEPS):
        remote = coordinator.schedule(step_fn, args=(tf.constant(step),))
        losses.append(float(remote.fetch()))
        print(f"step {step}: loss {losses[-1]:.6f}", flush=True)
    coordinator.join()
    out = {"losses": np.asarray(losses, np.float32)}
    out.update(model.weights())
    out["devices"] = np.array(json.dumps(model.devices()))
    np.savez(out_path, **out)
    print("DONE", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
