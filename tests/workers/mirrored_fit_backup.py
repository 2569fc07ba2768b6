"""`model.fit` under `MirroredStrategy` over 2 logical CPUs with
`keras.callbacks.BackupAndRestore`, optionally killing itself mid-epoch.

    python tests/workers/mirrored_fit_backup.py --out W.npz --trace T.txt
        --epochs 3 --steps-per-epoch 4 --backup-dir DIR --save-freq epoch|N
        [--die-at EPOCH BATCH]

Appends to `--trace`: `start`; `restored <metadata>` when a backup was
there to restore; `epoch batch` as each batch begins (so the test sees which
batches each run trained on); `killed` or `done`.

`--die-at E B`: SIGKILL itself at the end of batch `B` of epoch `E`
(0-based), after `BackupAndRestore` has handled that batch (its callback
runs first). Writes the final weights to `--out`.
"""

import argparse
import json
import os

import common

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--trace", required=True)
parser.add_argument("--epochs", type=int, required=True)
parser.add_argument("--steps-per-epoch", type=int, required=True)
parser.add_argument("--backup-dir", required=True)
parser.add_argument("--save-freq", required=True)
parser.add_argument("--die-at", type=int, nargs=2)
args = parser.parse_args()

tf = common.setup_tensorflow(logical_cpus=2)
import keras  # noqa: E402

save_freq = "epoch" if args.save_freq == "epoch" else int(args.save_freq)
trace = open(args.trace, "a", buffering=1)
trace.write("start\n")
metadata_path = os.path.join(args.backup_dir, "training_metadata.json")
if os.path.exists(metadata_path):
    with open(metadata_path) as f:
        trace.write(f"restored {json.dumps(json.load(f))}\n")


class Trace(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        trace.write(f"{self.epoch} {batch}\n")

    def on_train_batch_end(self, batch, logs=None):
        if args.die_at and [self.epoch, batch] == args.die_at:
            trace.write("killed\n")
            trace.flush()
            common.die()


strategy = common.make_mirrored_strategy(tf, 2)
assert strategy.num_replicas_in_sync == 2
model = common.fit_model(
    strategy, args.epochs, args.steps_per_epoch,
    callbacks=[
        keras.callbacks.BackupAndRestore(args.backup_dir, save_freq=save_freq),
        Trace(),
    ],
)
common.save_weights_npz(args.out, model)
trace.write("done\n")
trace.close()
common.exit_now(0)
