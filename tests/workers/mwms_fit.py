"""`model.fit` under `MultiWorkerMirroredStrategy`: one worker of a TF_CONFIG
cluster fits the common test model for a few steps.

    python tests/workers/mwms_fit.py --out RESULT.json

Writes `{"ok": true}` and exits 0 when `fit` succeeds. When it raises, writes
`{"ok": false, "error": ..., "traceback": ..., "known_keras_bug": bool}` and
exits 3. `known_keras_bug` says the exception is the one Keras 3.15 raises
(measured with keras 3.15.1 / TF 2.21): the failure is inside Keras's own
training code, before any of keras_moe's layers matter (the same happens with
a model of two `Dense` layers): `_maybe_symbolic_build` reduces a
`PerReplica` batch, and, with that skipped, the per-replica metric reduction
fails.
"""

import argparse
import traceback

import common

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--steps", type=int, default=2)
args = parser.parse_args()

tf = common.setup_tensorflow(inter_op_threads=4)
import keras  # noqa: E402

strategy = common.make_multi_worker_strategy(tf)

with strategy.scope():
    model = common.build_model()
    model.compile(common.make_optimizer(), "mse", jit_compile=False)

x, y = common.dataset_arrays(args.steps)
dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(common.GLOBAL_BATCH)
options = tf.data.Options()
options.experimental_distribute.auto_shard_policy = (
    tf.data.experimental.AutoShardPolicy.DATA
)
dataset = dataset.with_options(options)

keras.config.disable_traceback_filtering()  # the whole Keras stack

try:
    model.fit(dataset, epochs=1, verbose=0)
except Exception as e:  # noqa: BLE001 - the test classifies it
    text = traceback.format_exc()
    # The two failures Keras 3.15 has here, named by the Keras function
    # they happen in and their message.
    known = ("keras/src/backend/tensorflow/trainer.py" in text) and (
        ("_maybe_symbolic_build" in text and "PerReplica" in str(e))
        or ("reduce_per_replica" in text
            and "Invalid reduction dimension" in str(e))
    )
    common.write_json(args.out, {
        "ok": False, "error": f"{type(e).__name__}: {e}"[:2000],
        "traceback": text[-6000:], "known_keras_bug": known,
    })
    print(text)
    common.exit_now(3)

common.write_json(args.out, {"ok": True})
print("fit succeeded")
common.exit_now(0)
