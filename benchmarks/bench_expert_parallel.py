"""Experts sharded over replicas against replicated experts (issue 15,
point 9), on one machine split into logical CPU devices.

Two models, `Input(d) -> MixtureOfExperts(E, k=2, hidden_sizes=(h,),
dispatch="capacity") -> Dense(d)`, are built under one
`MirroredStrategy` of R replicas: the replicated layer (every replica
holds every expert) and `expert_parallel=True` (replica `r` holds experts
`[r * E / R, (r + 1) * E / R)`), both trained with Adam (the sharded one
through `keras_moe.ExpertParallelOptimizer`). Printed:

- the expert bytes on each device: the experts' kernels and Adam's two
  slots per kernel, float32 (sharded: 1/R of the replicated);
- the tokens per expert per step: how many routed tokens each copy of an
  expert runs on in one step (mean over experts); a replicated expert sees
  its own replica's tokens, a sharded one those of every replica, R times
  as many;
- the median time of a training step (`train_on_batch` of one global
  batch, the two models alternated), and its ratio sharded / replicated.

On CPU logical devices share the machine's cores, so step times say how
much the all-to-alls cost there, not what GPUs would do (docs/performance.md).

    python benchmarks/bench_expert_parallel.py            # R=4, ~1-2 minutes
    python benchmarks/bench_expert_parallel.py --quick    # tiny, seconds
"""

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)
from machine import REPO_ROOT, git_revision, machine_info  # noqa: E402

if REPO_ROOT not in sys.path:
    sys.path.append(REPO_ROOT)

FULL = {"replicas": 4, "tokens": 1024, "d": 128, "hidden": 512,
        "experts": 32, "steps": 10}
QUICK = {"replicas": 2, "tokens": 64, "d": 8, "hidden": 16, "experts": 4,
         "steps": 2}


def _split_cpu(num_devices):
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * num_devices)
    return tf


def _model(size, expert_parallel):
    import keras
    import keras_moe

    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((size["d"],)),
        keras_moe.MixtureOfExperts(
            size["experts"], k=2, hidden_sizes=(size["hidden"],),
            dispatch="capacity", expert_parallel=expert_parallel,
            name="moe"),
        keras.layers.Dense(size["d"]),
    ])
    optimizer = keras.optimizers.Adam(1e-3)
    if expert_parallel:
        optimizer = keras_moe.ExpertParallelOptimizer(optimizer)
    model.compile(optimizer=optimizer, loss="mse")
    model.optimizer.build(model.trainable_variables)
    return model


def _expert_bytes_per_device(model, tf):
    """{device: bytes} of the experts' kernels and their optimizer slots."""
    variables = list(model.get_layer("moe").experts.trainable_weights) + [
        v for v in model.optimizer.variables if "experts_kernel" in v.path]
    per_device = {}
    for variable in variables:
        # A mirrored variable has a copy on every device, a shard one.
        for copy in model.distribute_strategy.experimental_local_results(
                variable.value):
            device = tf.DeviceSpec.from_string(copy.device)
            key = "%s:%d" % (device.device_type, device.device_index)
            per_device[key] = per_device.get(key, 0) + (
                variable.shape.num_elements() * 4)
    return per_device


def _tokens_per_expert(model, x, tf):
    """Routed tokens one copy of an expert runs on in a step (mean over
    experts)."""
    moe = model.get_layer("moe")
    strategy = model.distribute_strategy
    num_replicas = strategy.num_replicas_in_sync
    per_replica = x.shape[0] // num_replicas
    counts = []
    for r in range(num_replicas):
        _, routing = moe(x[r * per_replica:(r + 1) * per_replica],
                         training=True, return_routing=True)
        counts.append(routing["part_sizes"].numpy())
    counts = sum(counts) if moe.expert_parallel else counts[0]
    return float(counts.mean())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, seconds (what the tests run)")
    args = parser.parse_args(argv)
    size = QUICK if args.quick else FULL
    tf = _split_cpu(size["replicas"])
    import numpy as np

    info = machine_info()
    print("Machine: %d CPUs (%s); keras_moe at %s; %d logical CPU "
          "devices." % (info["nproc"], info["cpu_model"], git_revision(),
                        size["replicas"]))
    print("Model: d %(d)d, hidden %(hidden)d, %(experts)d experts, k 2, "
          "global batch %(tokens)d tokens, %(replicas)d replicas, Adam."
          % size)
    devices = ["/cpu:%d" % i for i in range(size["replicas"])]
    strategy = tf.distribute.MirroredStrategy(devices)
    with strategy.scope():
        models = {"replicated": _model(size, False),
                  "sharded": _model(size, True)}
    rng = np.random.default_rng(0)
    x = rng.normal(size=(size["tokens"], size["d"])).astype("float32")
    y = rng.normal(size=(size["tokens"], size["d"])).astype("float32")
    for model in models.values():  # trace
        model.train_on_batch(x, y)
    times = {name: [] for name in models}
    for _ in range(size["steps"]):
        for name, model in models.items():
            start = time.perf_counter()
            model.train_on_batch(x, y)
            times[name].append(time.perf_counter() - start)
    rows = []
    for name, model in models.items():
        per_device = _expert_bytes_per_device(model, tf)
        rows.append((
            name,
            max(per_device.values()) / 2**20,
            len(per_device),
            _tokens_per_expert(model, x, tf),
            statistics.median(times[name]) * 1e3,
        ))
    print()
    print("| layer | expert bytes per device (MiB, kernels + Adam slots) "
          "| devices | tokens per expert per step | step (ms, median) |")
    print("|---|---|---|---|---|")
    for name, mib, num_devices, tokens, step in rows:
        print("| %s | %.3f | %d | %.1f | %.1f |" % (
            name, mib, num_devices, tokens, step))
    replicated, sharded = rows
    print()
    print("sharded / replicated: expert bytes per device %.2f (1/R = %.2f), "
          "tokens per expert %.2f (R = %d), step time %.2f" % (
              sharded[1] / replicated[1], 1 / size["replicas"],
              sharded[3] / replicated[3], size["replicas"],
              sharded[4] / replicated[4]))
    return rows


if __name__ == "__main__":
    main()
