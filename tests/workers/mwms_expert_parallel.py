"""Custom-loop training of a MixtureOfExperts whose experts are sharded
over the replicas of a `MultiWorkerMirroredStrategy`: worker `t` of `n`
local replicas holds experts `[t * n * E / R, (t + 1) * n * E / R)`, and
tokens reach them by all-to-alls over gRPC.

    python tests/workers/mwms_expert_parallel.py --out W.npz --steps 3
        --ckpt-dir DIR [--local-cpus 2]

`--local-cpus n`: `n` replicas on this worker, one per logical CPU (on
CPUs the strategy runs one replica a worker unless told otherwise, as here
through its private `_initialize_local_devices`: a test-only patch).

Writes the whole weights (sharded kernels all-gathered) to `--out` as
`names, w0, w1, ...` plus `local_shapes` (the shapes of the sharded
kernels this worker holds), and a `tf.train.Checkpoint` of the model and
the optimizer (the chief's in `--ckpt-dir`, the others' in a temporary directory removed
after), and exits 0.
"""

import argparse
import shutil

import common

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--steps", type=int, required=True)
parser.add_argument("--ckpt-dir", required=True)
parser.add_argument("--local-cpus", type=int, default=1)
args = parser.parse_args()

tf = common.setup_tensorflow(
    inter_op_threads=4,
    logical_cpus=args.local_cpus if args.local_cpus > 1 else None)
if args.local_cpus > 1:
    # On CPUs MultiWorkerMirroredStrategy runs one replica a worker; to
    # run several (as it does on GPUs), the test makes it take this
    # worker's logical CPUs as it would take its GPUs.
    from tensorflow.python.distribute import collective_all_reduce_strategy

    def _local_cpus(self, cluster_resolver, worker_device):
        return tuple(f"{worker_device}/device:CPU:{i}"
                     for i in range(args.local_cpus)), "CPU"

    collective_all_reduce_strategy.CollectiveAllReduceExtended \
        ._initialize_local_devices = _local_cpus
import numpy as np  # noqa: E402

from keras_moe import all_to_all  # noqa: E402

# A bug in a collective fails the worker (and its test) instead of hanging.
all_to_all.TIMEOUT_SECONDS = 60.0
strategy = common.make_multi_worker_strategy(tf)
task_index, num_workers = common.task_from_tf_config()

with strategy.scope():
    model = common.build_expert_parallel_model()
    optimizer = common.make_expert_parallel_optimizer()
    optimizer.build(model.trainable_variables)
train_step = common.make_train_step(strategy, model, optimizer)
x, y = common.global_batches(args.steps)
for s in range(args.steps):
    train_step(x[s], y[s])

with strategy.scope():
    names, weights = common.whole_weights(model)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)
    write_dir = (args.ckpt_dir if task_index == 0
                 else f"{args.ckpt_dir}.worker{task_index}")
    checkpoint.write(f"{write_dir}/model")
if task_index:
    shutil.rmtree(write_dir, ignore_errors=True)
local_shapes = [list(shard.shape) for kernel in
                model.get_layer("moe").experts.kernels
                for shard in kernel.shards]
arrays = {f"w{i}": w for i, w in enumerate(weights)}
np.savez(args.out, names=np.array(names), local_shapes=np.array(local_shapes),
         **arrays)
print(f"worker {task_index}: done", flush=True)
common.exit_now(0)
