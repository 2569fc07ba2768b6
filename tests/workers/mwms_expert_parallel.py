"""Custom-loop training of a MixtureOfExperts whose experts are sharded
over the replicas of a `MultiWorkerMirroredStrategy` (one replica a worker
on CPUs): worker `t` holds experts `[t * E / R, (t + 1) * E / R)`, tokens
reach them by all-to-alls over gRPC.

    python tests/workers/mwms_expert_parallel.py --out W.npz --steps 3
        --ckpt-dir DIR

Writes the whole weights (sharded kernels all-gathered) to `--out` as
`names, w0, w1, ...` plus `local_shapes` (the shapes of the sharded
kernels this worker holds), and a `tf.train.Checkpoint` of the model (the
chief's in `--ckpt-dir`, the others' in a temporary directory removed
after), and exits 0.
"""

import argparse
import shutil

import common

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--steps", type=int, required=True)
parser.add_argument("--ckpt-dir", required=True)
args = parser.parse_args()

tf = common.setup_tensorflow(inter_op_threads=4)
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
    checkpoint = tf.train.Checkpoint(model=model)
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
