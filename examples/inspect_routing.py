"""Reading the routing of a trained Mixture-of-Experts model.

A small word tagger (word ids -> frozen random 4-d word vectors ->
MixtureOfExperts -> softmax over 4 word classes) is trained on synthetic
sentences (no download, fixed seeds) with
``keras_moe.callbacks.RoutingMonitor`` watching the MoE layer. Each expert
is one linear map, and one linear map cannot tag 24 random 4-d vectors
well: the model does better when the gate sends different words to
different experts. The script then shows where the words went:

1. for a few sentences, the words each expert received and their gates
   (``keras_moe.expert_to_tokens`` with the words themselves as
   identifiers, and ``keras_moe.expert_to_gates``), and each expert's load;
2. over a test set, how each word class is split between the experts
   (the share of its gates each expert got): whether the experts
   specialised;
3. the files the callback wrote: a PNG heat map of expert load over
   training (one row per expert, one column per step; blue = idle, grey =
   a fair share, red = twice a fair share or more) and TensorBoard event
   files with per-expert load and importance histograms
   (``tensorboard --logdir OUT/logs``).

Run it from the repository root::

    python examples/inspect_routing.py                  # under a minute on 2 CPU cores
    python examples/inspect_routing.py --quick          # a smoke test
    python examples/inspect_routing.py --out routing/   # where the files go
"""

import argparse
import glob
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
from keras_moe.callbacks import RoutingMonitor  # noqa: E402

CLASSES = {
    "animal": ["cat", "dog", "fox", "owl", "bee", "eel"],
    "colour": ["red", "blue", "green", "pink", "gold", "grey"],
    "number": ["one", "two", "three", "four", "five", "six"],
    "verb": ["runs", "eats", "sees", "hides", "sings", "digs"],
}
CLASS_NAMES = list(CLASSES)
WORDS = ["<pad>"] + [word for words in CLASSES.values() for word in words]
WORD_CLASS = np.array([-1] + [c for c, words in enumerate(CLASSES.values())
                              for _ in words])
MAX_LEN = 8


def make_data(num_sentences, seed):
    """``(ids [n, MAX_LEN] int32, padded with 0; tags [n, MAX_LEN] int32,
    each word's class, 0 at padding where the mask hides it)``."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((num_sentences, MAX_LEN), np.int32)
    for row in range(num_sentences):
        length = rng.integers(3, MAX_LEN + 1)
        ids[row, :length] = rng.integers(1, len(WORDS), size=length)
    tags = np.maximum(WORD_CLASS[ids], 0).astype(np.int32)
    return ids, tags


def build_model(num_experts, k, seed):
    ids = keras.Input((None,), dtype="int32", name="ids")
    # Frozen random word vectors: the MoE has to learn the classes, and its
    # experts are linear, so the gate has to tell words apart.
    x = keras.layers.Embedding(
        len(WORDS), 4, mask_zero=True, trainable=False,
        embeddings_initializer=keras.initializers.RandomNormal(seed=seed),
        name="embedding")(ids)
    moe = keras_moe.MixtureOfExperts(num_experts=num_experts, k=k,
                                     hidden_sizes=(), output_dim=8,
                                     seed=seed, name="moe")
    probs = keras.layers.Dense(len(CLASSES), activation="softmax",
                               name="tags")(moe(x))
    return keras.Model(ids, probs, name="tagger"), moe


def route(model, moe, ids):
    """The trained MoE layer's routing of ``ids`` (inference, no noise)."""
    embed = keras.Model(model.input, model.get_layer("embedding").output)
    _, routing = moe(embed(ids), mask=ids != 0, return_routing=True)
    return routing


def show_sentences(model, moe, ids):
    routing = route(model, moe, ids)
    words = tf.constant(np.array(WORDS, dtype=object)[ids].astype(str))
    tokens = keras_moe.expert_to_tokens(routing, words)
    gates = keras_moe.expert_to_gates(routing)
    print("sentences:")
    for row in ids:
        print("  " + " ".join(WORDS[i] for i in row if i))
    print(f"words each expert received (gate), k = {moe.gating.k}:")
    for expert, (names, values) in enumerate(zip(tokens, gates)):
        received = ", ".join(
            f"{name.decode()} ({gate:.2f})"
            for name, gate in zip(names.numpy(), values.numpy()))
        print(f"  expert {expert}: {received or '-'}")
    load = routing["load"].numpy()
    print("load (tokens per expert): "
          + " ".join(f"{v:.0f}" for v in load)
          + f"; CV^2 = {float(keras_moe.cv_squared(load)):.3f}")


def class_by_expert(model, moe, ids):
    """``[classes, experts]``: each word class's share of the gates that
    went to each expert (rows sum to 1)."""
    routing = route(model, moe, ids)
    gates = routing["gates"].numpy()[ids != 0]          # [real tokens, n]
    classes = WORD_CLASS[ids[ids != 0]]
    table = np.zeros((len(CLASSES), moe.num_experts))
    np.add.at(table, classes, gates)
    return table / table.sum(axis=1, keepdims=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="small data, two epochs (smoke test)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="training epochs (default 20, 2 with --quick)")
    parser.add_argument("--num-experts", type=int, default=4)
    parser.add_argument("-k", type=int, default=2)
    parser.add_argument("--out", default=None,
                        help="directory for the heat map and TensorBoard "
                             "logs (default: a new temporary directory)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)

    out = args.out or tempfile.mkdtemp(prefix="inspect_routing_")
    num_train = 512 if args.quick else 4096
    epochs = args.epochs or (2 if args.quick else 20)
    keras.utils.set_random_seed(args.seed)
    x_train, y_train = make_data(num_train, seed=args.seed)
    x_test, y_test = make_data(512, seed=args.seed + 1000)

    model, moe = build_model(args.num_experts, args.k, args.seed)
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    monitor = RoutingMonitor(
        log_dir=os.path.join(out, "logs"),
        heatmap_path=os.path.join(out, "load_heatmap.png"),
        update_freq=1 if args.quick else 4)
    model.fit(x_train, y_train, batch_size=64, epochs=epochs, verbose=0,
              callbacks=[monitor])
    accuracy = model.evaluate(x_test, y_test, verbose=0,
                              return_dict=True)["accuracy"]
    print(f"tagging accuracy on test words: {accuracy:.3f} "
          f"(chance: {1 / len(CLASSES):.3f})")

    show_sentences(model, moe, x_test[:3])

    table = class_by_expert(model, moe, x_test)
    print("share of each word class's gates by expert "
          "(1/num_experts each = no specialisation):")
    print("  " + " " * 8 + "".join(f"{f'expert {i}':>10s}"
                                   for i in range(moe.num_experts)))
    for name, row in zip(CLASS_NAMES, table):
        print(f"  {name:8s}" + "".join(f"{v:10.2f}" for v in row))

    history = monitor.history["moe"]
    heatmap = os.path.join(out, "load_heatmap.png")
    with open(heatmap, "rb") as f:
        is_png = f.read(8) == b"\x89PNG\r\n\x1a\n"
    events = glob.glob(os.path.join(out, "logs", "events.out.tfevents.*"))
    print(f"RoutingMonitor recorded {len(history['step'])} steps "
          f"({history['step'][0]}..{history['step'][-1]}) of "
          f"{history['load'].shape[1]} experts")
    print(f"heat map: {heatmap} ({'PNG' if is_png else 'NOT A PNG'}, "
          f"{os.path.getsize(heatmap)} bytes)")
    print(f"TensorBoard histograms moe/load, moe/importance: "
          f"{len(events)} event file(s) in {os.path.join(out, 'logs')}")
    return 0 if is_png and events else 1


if __name__ == "__main__":
    sys.exit(main())
