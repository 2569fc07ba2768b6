"""Custom-loop training of the common test model, in one process or as one
worker of a `MultiWorkerMirroredStrategy` cluster (TF_CONFIG), optionally
checkpointing with `tf.train.CheckpointManager`, resuming from the latest
checkpoint and killing itself after a given step.

    python tests/workers/mwms_train.py --out W.npz --steps 3 [--multi-worker]
        [--ckpt-dir DIR [--die-after-step S --die-task T]]

Writes the final weights to `--out` (`w0, w1, ...` in `model.get_weights()`
order, plus `start_step`, the step it resumed from) and exits 0.

Checkpoints (the layout the TensorFlow multi-worker docs recommend): every
worker saves after every step, since saving may involve collectives; the
chief (task 0) writes to `--ckpt-dir`, every other worker to its own
temporary `<ckpt-dir>.worker<i>` that it removes after saving. On start every
worker restores the chief's latest checkpoint (one machine here, so one
shared filesystem).

`--die-after-step S --die-task T`: worker T sends itself SIGKILL right after
its save of step S, once the chief's checkpoint of step S is on disk (so the
restart resumes from step S exactly, whichever worker dies).
"""

import argparse
import contextlib
import shutil
import sys
import time

import common

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--steps", type=int, required=True)
parser.add_argument("--multi-worker", action="store_true")
parser.add_argument("--ckpt-dir")
parser.add_argument("--die-after-step", type=int)
parser.add_argument("--die-task", type=int, default=0)
args = parser.parse_args()

tf = common.setup_tensorflow(inter_op_threads=4 if args.multi_worker else None)

if args.multi_worker:
    strategy = common.make_multi_worker_strategy(tf)
    task_index, num_workers = common.task_from_tf_config()
    assert strategy.num_replicas_in_sync == num_workers
else:
    strategy = None  # no strategy at all: the single-process reference
    task_index = 0
is_chief = task_index == 0

with strategy.scope() if strategy else contextlib.nullcontext():
    model = common.build_model()
    optimizer = common.make_optimizer()
    optimizer.build(model.trainable_variables)
    step = tf.Variable(0, dtype=tf.int64, name="step")
train_step = common.make_train_step(strategy, model, optimizer)

manager = None
if args.ckpt_dir:
    checkpoint = tf.train.Checkpoint(
        model=model, optimizer=optimizer, step=step
    )
    latest = tf.train.latest_checkpoint(args.ckpt_dir)
    if latest:
        checkpoint.restore(latest).assert_consumed()
        print(f"worker {task_index}: restored {latest}", flush=True)
    write_dir = (
        args.ckpt_dir if is_chief else f"{args.ckpt_dir}.worker{task_index}"
    )
    manager = tf.train.CheckpointManager(checkpoint, write_dir, max_to_keep=2)

start_step = int(step.numpy())
x, y = common.global_batches(args.steps)
for s in range(start_step, args.steps):
    train_step(x[s], y[s])
    step.assign_add(1)
    if manager is not None:
        manager.save(checkpoint_number=s + 1)
        if not is_chief:
            shutil.rmtree(manager.directory, ignore_errors=True)
        if args.die_after_step == s + 1 and args.die_task == task_index:
            # Wait (bounded) until the chief's checkpoint of this step is
            # complete, so that the restart provably resumes from it.
            suffix = f"ckpt-{s + 1}"
            deadline = time.monotonic() + 30
            while not str(tf.train.latest_checkpoint(args.ckpt_dir)).endswith(
                suffix
            ):
                if time.monotonic() > deadline:
                    sys.exit(f"worker {task_index}: no chief {suffix}")
                time.sleep(0.05)
            print(f"worker {task_index}: killing myself after step {s + 1}")
            common.die()

common.save_weights_npz(args.out, model, start_step=start_step)
print(f"worker {task_index}: done, steps {start_step} to {args.steps}")
common.exit_now(0)
