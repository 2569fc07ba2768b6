"""Quickstart: train a small Mixture-of-Experts model on synthetic data.

The task is a piecewise regression problem. Inputs are drawn around
``NUM_REGIONS`` centres on a sphere, and the target in each region is a
different random linear function of the input. One linear map cannot fit all
regions at once, but a mixture of experts can: the gate learns which region an
input is in and sends it to experts that learn that region's function.

The script

1. generates the data (no download, fixed seeds),
2. trains ``inputs -> MixtureOfExperts -> Dense(1)`` with ``model.fit``,
3. prints the test MSE and R^2, next to a plain linear model for comparison,
4. prints the load balance of the experts on a test batch
   (``return_routing=True``: tokens per expert and the CV^2 of the load),
5. exports a SavedModel with ``model.export``, reloads it with
   ``tf.saved_model.load`` and checks that its ``serve`` signature gives the
   same predictions as ``model.predict``.

It exits with a non-zero status if the export check fails.

Run it from the repository root::

    python examples/quickstart.py           # about a minute on 2 CPU cores
    python examples/quickstart.py --quick   # tiny data, 1 epoch: a smoke test
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

NUM_FEATURES = 16
NUM_REGIONS = 8
RADIUS = 3.0


def make_data(num_samples, seed):
    """Returns ``(x, y)`` float32 arrays for the piecewise-linear task.

    The region centres and per-region functions are fixed (seed 0) so that
    the train and test splits come from the same task; ``seed`` only picks
    the samples.
    """
    task = np.random.default_rng(0)
    centres = task.normal(size=(NUM_REGIONS, NUM_FEATURES))
    centres *= RADIUS / np.linalg.norm(centres, axis=1, keepdims=True)
    weights = task.normal(size=(NUM_REGIONS, NUM_FEATURES))
    weights /= np.sqrt(NUM_FEATURES)

    rng = np.random.default_rng(seed)
    x = centres[rng.integers(NUM_REGIONS, size=num_samples)]
    x = x + rng.normal(size=(num_samples, NUM_FEATURES))
    # The region of a point is its nearest centre. All centres have the same
    # norm, so that is the centre with the largest dot product: a linear gate
    # without a bias (like the MoE's) can tell the regions apart.
    region = np.argmax(x @ centres.T, axis=1)
    y = np.sum(x * weights[region], axis=1, keepdims=True)
    return x.astype("float32"), y.astype("float32")


def build_model(num_experts, k, seed):
    """``inputs -> MixtureOfExperts -> Dense(1)``; returns ``(model, moe)``."""
    inputs = keras.Input((NUM_FEATURES,), name="features")
    moe = keras_moe.MixtureOfExperts(
        num_experts=num_experts,
        k=k,
        hidden_sizes=(32,),
        output_dim=32,
        loss_coef=1e-2,
        seed=seed,
        name="moe",
    )
    outputs = keras.layers.Dense(1, name="head")(moe(inputs))
    return keras.Model(inputs, outputs, name="moe_regressor"), moe


def build_linear_baseline():
    inputs = keras.Input((NUM_FEATURES,))
    return keras.Model(inputs, keras.layers.Dense(1)(inputs), name="linear")


def mse(y_true, y_pred):
    return float(np.mean((y_true - y_pred) ** 2))


def report_load_balance(moe, x_batch):
    """Prints tokens per expert and the CV^2 of the load on ``x_batch``."""
    _, routing = moe(x_batch, training=False, return_routing=True)
    load = np.asarray(routing["load"])
    importance = np.asarray(routing["importance"])
    cv2_load = float(keras_moe.cv_squared(routing["load"]))
    cv2_importance = float(keras_moe.cv_squared(routing["importance"]))
    print(f"expert load on {len(x_batch)} test examples "
          f"(examples sent to each expert):")
    print("  load:       " + " ".join(f"{v:6.0f}" for v in load))
    print("  importance: " + " ".join(f"{v:6.1f}" for v in importance))
    print(f"load balance: CV^2(load) = {cv2_load:.4f}, "
          f"CV^2(importance) = {cv2_importance:.4f}, "
          f"max/mean load = {float(keras_moe.max_overload(load)):.3f} "
          f"(CV^2 = 0 is perfectly balanced; "
          f"all on one expert gives {len(load) - 1})")


def check_export(model, x, atol=1e-5):
    """Exports ``model`` as a SavedModel and checks that ``serve`` matches.

    Returns the largest absolute difference; raises ``AssertionError`` if it
    is above ``atol``.
    """
    expected = model.predict(x, batch_size=256, verbose=0)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "moe_savedmodel")
        model.export(path, verbose=False)
        reloaded = tf.saved_model.load(path)
        served = reloaded.serve(tf.constant(x)).numpy()
    max_diff = float(np.max(np.abs(served - expected)))
    assert served.shape == expected.shape and max_diff <= atol, (
        f"SavedModel predictions differ from model.predict: shapes "
        f"{served.shape} vs {expected.shape}, max |diff| = {max_diff:.3g} "
        f"(allowed {atol:g})")
    return max_diff


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny data and one epoch (smoke test)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="training epochs (default 20, 1 with --quick)")
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("-k", type=int, default=2,
                        help="experts used per example")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)

    num_train, num_test = (512, 256) if args.quick else (16384, 2048)
    epochs = args.epochs or (1 if args.quick else 20)
    keras.utils.set_random_seed(args.seed)

    x_train, y_train = make_data(num_train, seed=args.seed)
    x_test, y_test = make_data(num_test, seed=args.seed + 1000)

    model, moe = build_model(args.num_experts, args.k, seed=args.seed)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="mse")
    model.fit(x_train, y_train, batch_size=128, epochs=epochs,
              validation_split=0.1, verbose=2 if not args.quick else 0)

    baseline = build_linear_baseline()
    baseline.compile(optimizer=keras.optimizers.Adam(3e-3), loss="mse")
    baseline.fit(x_train, y_train, batch_size=128, epochs=epochs, verbose=0)

    pred = model.predict(x_test, batch_size=256, verbose=0)
    test_mse = mse(y_test, pred)
    r2 = 1.0 - test_mse / float(np.var(y_test))
    baseline_mse = mse(y_test, baseline.predict(x_test, verbose=0))
    print(f"test MSE: {test_mse:.4f} (R^2 = {r2:.3f}); "
          f"linear model: {baseline_mse:.4f}; "
          f"predicting the mean: {float(np.var(y_test)):.4f}")

    report_load_balance(moe, x_test[:1024])

    try:
        max_diff = check_export(model, x_test)
    except AssertionError as err:
        print(f"export check FAILED: {err}", file=sys.stderr)
        return 1
    print(f"export check passed: SavedModel serve() matches model.predict "
          f"(max |diff| = {max_diff:.2e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
