"""Exporting a Mixture-of-Experts model as a SavedModel and serving it.

The script trains a small text classifier (token ids -> Embedding with a
padding mask -> MixtureOfExperts -> masked average -> softmax) on a
synthetic task (no download, fixed seeds), then

1. exports it with ``model.export(dir)``: a TensorFlow SavedModel for TF
   Serving, TFLite converters or any TensorFlow runtime, in inference mode
   (no gating noise: deterministic);
2. prints the serving signature (input and output names, shapes, dtypes);
3. reloads it twice, with ``tf.saved_model.load`` (calling the ``serve``
   function and the ``serving_default`` signature) and as a Keras layer with
   ``keras.layers.TFSMLayer``, and checks that all give the predictions of
   ``model.predict``, including for a batch size and sequence length not
   seen in training.

It exits with a non-zero status if a check fails.

The task: each sequence (ids 1..VOCAB, padded with 0 to different lengths)
belongs to the class of the token group that occurs most often in it (ids
are in NUM_CLASSES groups by ``(id - 1) % NUM_CLASSES``).

Run it from the repository root::

    python examples/serving.py                    # about a minute on 2 CPU cores
    python examples/serving.py --quick            # a smoke test
    python examples/serving.py --export-dir out/  # keep the SavedModel
"""

import argparse
import os
import sys
import tempfile

import numpy as np

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# Before TensorFlow loads: 3 also hides the CUDA/cuInit error lines it
# prints on machines without a GPU driver.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_moe  # noqa: E402

VOCAB = 40
NUM_CLASSES = 4
MAX_LEN = 12


def make_data(num_sequences, seed, max_len=MAX_LEN):
    """``(ids [n, max_len] int32 padded with 0, labels [n] int32)``."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((num_sequences, max_len), np.int32)
    labels = np.zeros((num_sequences,), np.int32)
    for row in range(num_sequences):
        length = rng.integers(3, max_len + 1)
        tokens = rng.integers(1, VOCAB + 1, size=length)
        counts = np.bincount((tokens - 1) % NUM_CLASSES,
                             minlength=NUM_CLASSES)
        ids[row, :length] = tokens
        labels[row] = np.argmax(counts)   # ties: the lowest class
    return ids, labels


def build_model(num_experts, k, seed):
    ids = keras.Input((None,), dtype="int32", name="ids")
    x = keras.layers.Embedding(VOCAB + 1, 16, mask_zero=True)(ids)
    x = keras_moe.MixtureOfExperts(num_experts=num_experts, k=k,
                                   hidden_sizes=(32,), seed=seed,
                                   name="moe")(x)
    x = keras.layers.GlobalAveragePooling1D()(x)   # averages real tokens
    probs = keras.layers.Dense(NUM_CLASSES, activation="softmax",
                               name="probs")(x)
    return keras.Model(ids, probs, name="moe_classifier")


def describe_signature(reloaded):
    """The serving signature as printable lines."""
    signature = reloaded.signatures["serving_default"]
    lines = ["serving signature 'serving_default':"]
    _, kwargs = signature.structured_input_signature
    for name, spec in sorted(kwargs.items()):
        lines.append(f"  input  {name}: shape {spec.shape}, "
                     f"dtype {spec.dtype.name}")
    for name, spec in sorted(signature.structured_outputs.items()):
        lines.append(f"  output {name}: shape {spec.shape}, "
                     f"dtype {spec.dtype.name}")
    return lines


def check(name, got, expected, atol):
    diff = float(np.max(np.abs(np.asarray(got) - expected)))
    if np.shape(got) != np.shape(expected) or not diff <= atol:
        raise AssertionError(
            f"{name} differs from model.predict: shapes {np.shape(got)} vs "
            f"{np.shape(expected)}, max |diff| = {diff:.3g} (allowed {atol})")
    print(f"  {name:42s} max |diff| = {diff:.2e}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="small data, one epoch (smoke test)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="training epochs (default 10, 1 with --quick)")
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("-k", type=int, default=2)
    parser.add_argument("--export-dir", default=None,
                        help="where to write the SavedModel (default: a "
                             "temporary directory, removed at the end)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)

    num_train = 512 if args.quick else 4096
    epochs = args.epochs or (1 if args.quick else 10)
    keras.utils.set_random_seed(args.seed)
    x_train, y_train = make_data(num_train, seed=args.seed)
    x_test, y_test = make_data(512, seed=args.seed + 1000)

    model = build_model(args.num_experts, args.k, args.seed)
    model.compile(optimizer=keras.optimizers.Adam(3e-3),
                  loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.fit(x_train, y_train, batch_size=64, epochs=epochs,
              verbose=0 if args.quick else 2)
    accuracy = model.evaluate(x_test, y_test, verbose=0,
                              return_dict=True)["accuracy"]
    print(f"test accuracy: {accuracy:.3f} (chance: {1 / NUM_CLASSES:.3f})")

    with tempfile.TemporaryDirectory() as tmp:
        export_dir = args.export_dir or os.path.join(tmp, "moe_classifier")
        model.export(export_dir, verbose=False)
        print(f"exported SavedModel to {export_dir}")

        reloaded = tf.saved_model.load(export_dir)
        for line in describe_signature(reloaded):
            print(line)

        # A batch size and a (longer) sequence length not seen in training.
        x_new, _ = make_data(7, seed=99, max_len=MAX_LEN + 5)
        signature = reloaded.signatures["serving_default"]
        layer = keras.layers.TFSMLayer(export_dir, call_endpoint="serve")
        print("serving matches model.predict:")
        try:
            for name, x in (("test set", x_test), ("new shapes", x_new)):
                expected = model.predict(x, verbose=0)
                check(f"{name}: serve()", reloaded.serve(tf.constant(x)),
                      expected, atol=1e-5)
                (output,) = signature(ids=tf.constant(x)).values()
                check(f"{name}: signatures['serving_default']", output,
                      expected, atol=1e-5)
                check(f"{name}: keras.layers.TFSMLayer", layer(x), expected,
                      atol=1e-5)
            # Inference is deterministic: no gating noise.
            first = reloaded.serve(tf.constant(x_new)).numpy()
            np.testing.assert_array_equal(
                first, reloaded.serve(tf.constant(x_new)).numpy())
        except AssertionError as err:
            print(f"serving check FAILED: {err}", file=sys.stderr)
            return 1
    print("serving check passed: the SavedModel gives model.predict's "
          "predictions, deterministically")
    return 0


if __name__ == "__main__":
    sys.exit(main())
