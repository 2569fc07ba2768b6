"""Language model: the paper's experiment in miniature, dense vs MoE at equal compute.

Shazeer et al. (2017, "Outrageously Large Neural Networks",
https://arxiv.org/abs/1701.06538, section 5.1 and appendix C.1) put a
Mixture-of-Experts layer between two stacked LSTM layers of a word-level
language model and compared it with dense models that do the same amount of
computation per word. This script runs that comparison at a size that fits a
laptop CPU:

    embedding -> LSTM -> MoE (every timestep) -> LSTM -> softmax over the vocabulary

with dropout and a residual connection around every layer but the softmax,
as in the paper's appendix C.1. The models differ only in the feed-forward
block between the two LSTMs:

* ``dense``: one feed-forward network (no biases, ReLU, the original
  expert's ``autoscale``) with ``k * expert_hidden`` hidden units, the
  paper's "MoE-1-Wide" baseline. Its multiply-adds per token equal those of
  ``k`` experts.
* ``moe-N``: ``keras_moe.MixtureOfExperts`` with ``N`` experts of
  ``expert_hidden`` hidden units each and ``k`` experts per token: the same
  expert multiply-adds per token (plus the small gating network), but ``N / k``
  times as many expert parameters.

The text is the pydoc topic help that ships with every Python
(``pydoc_data.topics``), or any UTF-8 text file given with ``--text``. It is
split into lower-cased words and punctuation (a run of one punctuation
character, like a table border, is one token); the ``--vocab-size`` most
frequent training tokens make the vocabulary (everything else becomes
``<unk>``). The token stream is cut into disjoint windows; every tenth block
of 16 consecutive windows (fewer for a short text) is held out for
validation.

Every model is trained with ``model.fit`` for the same number of steps, on
the same batches in the same order, with the MoE's balancing loss
(``--loss-coef``, the paper's CV^2 of importance and load). The script prints
a markdown table with, for each model, its parameters (total, without the
embedding and softmax, and active per token), the feed-forward block's
multiply-adds per token, the median time per training step, the best and
final validation perplexity, the training perplexity (dropout on) over the
last ``--eval-every`` steps, and the routing metrics that ``fit`` logged
(CV^2 of the load over the last ``--eval-every`` training steps, with
gating noise, and over the validation set, without; ``max_overload`` on
the validation set). It writes the table
(``results.md``), the curves (``history.json``) and a plot of validation
perplexity against training steps (``language_model.png``, needs
matplotlib) to ``--out``.

Run it from the repository root::

    python examples/language_model.py           # ~10-15 minutes on 2 CPU cores
    python examples/language_model.py --quick   # tiny: two small models, < 2 minutes
    python examples/language_model.py --text my_corpus.txt --experts 4,16 --steps 3000
"""

import argparse
import collections
import json
import math
import os
import re
import sys
import time

import numpy as np

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# Before TensorFlow loads: 3 also hides the CUDA/cuInit error lines it
# prints on machines without a GPU driver.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_moe  # noqa: E402

UNK = "<unk>"
TOKEN_PATTERN = re.compile(r"\w+|([^\w\s])\1*")
MAX_RUN = 4

# Default and --quick sizes. Command-line flags override any of them.
DEFAULTS = {
    "vocab_size": 2000,
    "seq_len": 32,
    "batch_size": 32,
    "d_model": 64,
    "expert_hidden": 64,
    "k": 4,
    "experts": "4,16,64",
    "steps": 1000,
    "eval_every": 100,
    "dropout": 0.1,
    "learning_rate": 3e-3,
}
QUICK = {
    "vocab_size": 500,
    "seq_len": 16,
    "batch_size": 16,
    "d_model": 32,
    "expert_hidden": 16,
    "k": 2,
    "experts": "4",
    "steps": 30,
    "eval_every": 15,
    "max_tokens": 30000,
}


# ----------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------

def load_text(path=None):
    """The text to model: the file at ``path``, or Python's pydoc topics."""
    if path is not None:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def tokenize(text):
    """Lower-cased words (``\\w+``) and punctuation.

    A run of one punctuation character (the ``-----`` and ``=====`` of the
    text's ASCII tables and rules) is one token, shortened to at most
    ``MAX_RUN`` characters, so that table borders do not swamp the text with
    trivially predictable tokens.
    """
    return [match.group(0)[:MAX_RUN] if match.group(1) else match.group(0)
            for match in TOKEN_PATTERN.finditer(text.lower())]


def build_vocab(tokens, vocab_size):
    """``<unk>`` (id 0) and the ``vocab_size - 1`` most frequent tokens.

    Ties in frequency are broken alphabetically, so the vocabulary does not
    depend on the order of the text.
    """
    counts = collections.Counter(tokens)
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    words = [UNK] + [word for word, _ in ranked[: vocab_size - 1]]
    return words, {word: i for i, word in enumerate(words)}


def make_windows(ids, seq_len):
    """Disjoint windows of ``seq_len + 1`` tokens as ``(inputs, targets)``.

    ``targets`` is ``inputs`` shifted by one token; no token is shared
    between two windows.
    """
    num = len(ids) // (seq_len + 1)
    windows = np.asarray(ids[: num * (seq_len + 1)], dtype="int32")
    windows = windows.reshape(num, seq_len + 1)
    return windows[:, :-1], windows[:, 1:]


def prepare_data(text, vocab_size, seq_len, max_tokens=None,
                 validation_every=10, block_windows=16):
    """Tokenizes, splits, builds the vocabulary on the training part.

    The token stream is cut into disjoint windows, and consecutive windows
    into blocks of ``block_windows``; every ``validation_every``-th block is
    validation, the rest training. Validation text is never seen in
    training, and it is spread over the whole text (the pydoc topics are
    sorted by name, and their tail is mostly tables: a validation set taken
    from the end alone would not look like the training set).
    """
    tokens = tokenize(text)
    if max_tokens:
        tokens = tokens[:max_tokens]
    span = seq_len + 1
    # Short texts: smaller blocks, so that there are validation_every of them.
    block_windows = max(1, min(block_windows,
                               len(tokens) // span // validation_every))
    block = np.arange(len(tokens)) // (span * block_windows)
    is_valid = (block % validation_every) == validation_every - 1
    words, index = build_vocab(
        [t for t, v in zip(tokens, is_valid) if not v], vocab_size)
    ids = np.array([index.get(token, 0) for token in tokens], dtype="int32")
    blocks = np.split(ids, np.arange(span * block_windows, len(ids),
                                     span * block_windows))
    parts = {False: [], True: []}
    for i, ids_block in enumerate(blocks):
        parts[i % validation_every == validation_every - 1].append(
            make_windows(ids_block, seq_len))
    train, valid = (
        tuple(np.concatenate([p[j] for p in parts[v]])
              if parts[v] else np.zeros((0, seq_len), "int32")
              for j in range(2))
        for v in (False, True)
    )
    if len(train[0]) == 0 or len(valid[0]) == 0:
        raise ValueError(
            f"The text is too short for seq_len={seq_len}: {len(tokens)} "
            f"tokens give {len(train[0])} training and {len(valid[0])} "
            f"validation windows (every {validation_every}th block of "
            f"{block_windows} windows is validation); use a longer text or "
            f"a smaller --seq-len.")
    # A unigram model fitted on the training tokens, as a reference point.
    counts = np.bincount(ids[~is_valid], minlength=len(words)) + 1.0
    log_p = np.log(counts / counts.sum())
    unigram_ppl = float(np.exp(-np.mean(log_p[valid[1].ravel()])))
    stats = {
        "tokens": len(tokens),
        "distinct_tokens": len(set(tokens)),
        "vocab_size": len(words),
        "unk_rate_valid": float(np.mean(valid[1] == 0)),
        "train_windows": int(len(train[0])),
        "valid_windows": int(len(valid[0])),
        "unigram_valid_ppl": unigram_ppl,
    }
    return train, valid, words, stats


def make_datasets(train, valid, batch_size, seed):
    """A shuffled, repeated training set and a finite validation set.

    Made afresh for each model after `keras.utils.set_random_seed(seed)`,
    it gives every model the same batches in the same order (one dataset
    object iterated twice would not: its shuffle carries on from where the
    previous iterator left it).
    """
    train_ds = (
        tf.data.Dataset.from_tensor_slices(train)
        .shuffle(len(train[0]), seed=seed, reshuffle_each_iteration=True)
        .repeat()
        .batch(batch_size, drop_remainder=True)
        .prefetch(2)
    )
    valid_ds = tf.data.Dataset.from_tensor_slices(valid).batch(batch_size)
    return train_ds, valid_ds


# ----------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------

@keras.saving.register_keras_serializable(package="language_model_example")
class DenseFeedForward(keras.layers.Layer):
    """The dense baseline: the original ``FeedForwardExpert``, used alone.

    ``d -> hidden (ReLU) -> d``, no biases, and the original's ``autoscale``
    (the output multiplied by ``(hidden / d) ** -0.5``), so it is exactly one
    expert of ``keras_moe.FeedForwardExperts`` with ``hidden`` units.
    """

    def __init__(self, hidden, **kwargs):
        super().__init__(**kwargs)
        self.hidden = hidden

    def build(self, input_shape):
        d = input_shape[-1]
        self.scale = (self.hidden / d) ** -0.5
        self.w1 = self.add_weight(name="kernel_0", shape=(d, self.hidden),
                                  initializer="glorot_uniform")
        self.w2 = self.add_weight(name="kernel_1", shape=(self.hidden, d),
                                  initializer="glorot_uniform")

    def call(self, x):
        h = keras.ops.relu(keras.ops.matmul(x, self.w1))
        return keras.ops.matmul(h, self.w2) * self.scale

    def get_config(self):
        return {**super().get_config(), "hidden": self.hidden}


def build_model(kind, num_experts, cfg, seed):
    """The paper's LM; ``kind`` is ``"dense"`` or ``"moe"``.

    Returns ``(model, ffn_layer)``.
    """
    d, vocab, p = cfg["d_model"], cfg["vocab_size"], cfg["dropout"]
    ids = keras.Input((cfg["seq_len"],), dtype="int32", name="ids")

    def dropout(x, name, index):
        # A seed per layer: layers with one seed would drop the same units.
        return keras.layers.Dropout(p, seed=seed * 100 + index,
                                    name=f"{name}_dropout")(x)

    def residual(x, layer, name, index):
        y = dropout(layer(x), name, index)
        return keras.layers.Add(name=f"{name}_residual")([x, y])

    x = keras.layers.Embedding(vocab, d, name="embedding")(ids)
    x = dropout(x, "embedding", 0)
    x = residual(x, keras.layers.LSTM(d, return_sequences=True, name="lstm_1"),
                 "lstm_1", 1)
    if kind == "dense":
        ffn = DenseFeedForward(cfg["k"] * cfg["expert_hidden"], name="ffn")
    else:
        ffn = keras_moe.MixtureOfExperts(
            num_experts=num_experts,
            k=cfg["k"],
            hidden_sizes=(cfg["expert_hidden"],),
            loss_coef=cfg["loss_coef"],
            seed=seed,
            name="moe",
        )
    x = residual(x, ffn, "ffn", 2)
    x = residual(x, keras.layers.LSTM(d, return_sequences=True, name="lstm_2"),
                 "lstm_2", 3)
    logits = keras.layers.Dense(vocab, name="softmax")(x)
    name = "dense" if kind == "dense" else f"moe-{num_experts}"
    return keras.Model(ids, logits, name=name), ffn


def count_params(model, ffn, kind, num_experts, cfg):
    """Trainable parameter counts and the feed-forward block's multiply-adds
    per token."""
    def trainable(layer):
        # Not `count_params()`: the MoE also holds non-trainable statistics
        # (`last_importance`, `last_load`), which are not parameters.
        return sum(int(np.prod(w.shape)) for w in layer.trainable_weights)

    total = trainable(model)
    outer = (trainable(model.get_layer("embedding"))
             + trainable(model.get_layer("softmax")))
    ffn_params = trainable(ffn)
    d, h, k = cfg["d_model"], cfg["expert_hidden"], cfg["k"]
    if kind == "dense":
        idle = 0
        macs = 2 * d * k * h
    else:
        per_expert = sum(int(np.prod(w.shape[1:])) for w in ffn.experts.kernels)
        idle = (num_experts - k) * per_expert
        # k experts, plus the gating network (the noise kernel only while
        # training, and it is not counted here).
        macs = k * per_expert + d * num_experts
    return {
        "params_total": int(total),
        "params_core": int(total - outer),
        "params_active_core": int(total - outer - idle),
        "params_ffn": int(ffn_params),
        "ffn_macs_per_token": int(macs),
    }


class StepTimer(keras.callbacks.Callback):
    """Wall time of each training step (``fit``'s batch begin to batch end)."""

    def __init__(self):
        super().__init__()
        self.times = []

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter() - self._start)

    def median_ms(self, skip=5):
        # The first steps include tracing the graph.
        times = self.times[skip:] if len(self.times) > 2 * skip else self.times
        return 1000.0 * float(np.median(times))


def train_one(kind, num_experts, cfg, train, valid, log):
    keras.utils.set_random_seed(cfg["seed"])
    train_ds, valid_ds = make_datasets(train, valid, cfg["batch_size"],
                                       cfg["seed"])
    model, ffn = build_model(kind, num_experts, cfg, cfg["seed"])
    model.compile(
        optimizer=keras.optimizers.Adam(cfg["learning_rate"], clipnorm=1.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        # The loss `fit` reports includes the MoE's balancing loss; this
        # metric is the cross-entropy alone, in nats per token.
        metrics=[keras.metrics.SparseCategoricalCrossentropy(
            from_logits=True, name="xent")],
        jit_compile=False,
    )
    counts = count_params(model, ffn, kind, num_experts, cfg)
    timer = StepTimer()
    epochs = max(1, cfg["steps"] // cfg["eval_every"])
    start = time.perf_counter()
    history = model.fit(
        train_ds,
        steps_per_epoch=cfg["eval_every"],
        epochs=epochs,
        validation_data=valid_ds,
        callbacks=[timer],
        shuffle=False,  # the dataset is already shuffled, with a fixed seed
        verbose=0,
    ).history
    elapsed = time.perf_counter() - start
    steps = [cfg["eval_every"] * (i + 1) for i in range(epochs)]
    val_ppl = [math.exp(v) for v in history["val_xent"]]
    train_ppl = [math.exp(v) for v in history["xent"]]
    result = {
        "name": model.name,
        "kind": kind,
        "num_experts": num_experts,
        "k": cfg["k"] if kind == "moe" else None,
        **counts,
        "ms_per_step": timer.median_ms(),
        "train_seconds": elapsed,
        "steps": steps,
        "val_ppl": val_ppl,
        "train_ppl": train_ppl,
        "best_val_ppl": min(val_ppl),
        "best_step": steps[int(np.argmin(val_ppl))],
        "final_val_ppl": val_ppl[-1],
        "final_train_ppl": train_ppl[-1],
    }
    if kind == "moe":
        # Means over the last `eval_every` training steps (noisy gating),
        # and over the validation set (no noise).
        prefix = ffn.name
        for key in ("aux_loss", "importance_cv2", "load_cv2", "max_overload"):
            result[f"train_{key}"] = float(history[f"{prefix}_{key}"][-1])
            result[f"val_{key}"] = float(history[f"val_{prefix}_{key}"][-1])
        result["load_cv2_curve"] = [float(v)
                                    for v in history[f"{prefix}_load_cv2"]]
    log(f"  {model.name}: {elapsed:.0f} s, {result['ms_per_step']:.1f} ms/step, "
        f"val ppl {val_ppl[-1]:.2f} (best {min(val_ppl):.2f} at step "
        f"{result['best_step']})")
    return result


# ----------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------

TABLE_HEADER = (
    "| model | experts (k) | params total | params w/o emb+softmax "
    "| active / token w/o emb+softmax | FFN mult-adds / token | ms / step "
    "| best val ppl (step) | final val ppl | train ppl, last interval "
    "| load CV² train / val | max overload val |"
)


def _fmt_int(n):
    return f"{n:,}"


def format_table(results):
    lines = [TABLE_HEADER, "|" + "---|" * TABLE_HEADER.count(" | ") + "---|"]
    for r in results:
        if r["kind"] == "moe":
            experts = f"{r['num_experts']} ({r['k']})"
            load = f"{r['train_load_cv2']:.3f} / {r['val_load_cv2']:.3f}"
            overload = f"{r['val_max_overload']:.2f}"
        else:
            experts, load, overload = "dense", "–", "–"
        lines.append(
            f"| {r['name']} | {experts} | {_fmt_int(r['params_total'])} "
            f"| {_fmt_int(r['params_core'])} "
            f"| {_fmt_int(r['params_active_core'])} "
            f"| {_fmt_int(r['ffn_macs_per_token'])} "
            f"| {r['ms_per_step']:.1f} "
            f"| {r['best_val_ppl']:.2f} ({r['best_step']}) "
            f"| {r['final_val_ppl']:.2f} | {r['final_train_ppl']:.2f} "
            f"| {load} | {overload} |"
        )
    return "\n".join(lines)


def plot(results, stats, path):
    """Validation (and training) perplexity against steps; False if skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("matplotlib is not installed: skipping the figure "
              "(pip install matplotlib, or pip install keras_moe[examples])")
        return False
    dense = next((r for r in results if r["kind"] == "dense"), None)
    fig, axes = plt.subplots(1, 3 if dense else 2, figsize=(
        14 if dense else 10, 4))
    ax_val, ax_train = axes[0], axes[-1]
    for r in results:
        ax_val.plot(r["steps"], r["val_ppl"], marker="o", markersize=3,
                    label=r["name"])
        ax_train.plot(r["steps"], r["train_ppl"], marker="o", markersize=3,
                      label=r["name"])
    ax_val.axhline(stats["unigram_valid_ppl"], color="gray", linestyle=":",
                   label="unigram")
    for ax, title in (
            (ax_val, "validation perplexity"),
            (ax_train, "training perplexity (mean of each "
                       f"{results[0]['steps'][0]} steps, dropout on)")):
        ax.set_xlabel("training step")
        ax.set_ylabel("perplexity")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_yticks([t for t in (10, 20, 30, 40, 60, 100, 150, 200, 300,
                                   500, 1000, 2000, 5000)
                       if ax.get_ylim()[0] <= t <= ax.get_ylim()[1]])
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    if dense:
        # The differences are small next to the fall of the curves: the
        # middle panel shows each model's validation perplexity relative to
        # the dense baseline's at the same step.
        ax = axes[1]
        for r in results:
            ax.plot(r["steps"], np.array(r["val_ppl"]) / dense["val_ppl"],
                    marker="o", markersize=3, label=r["name"])
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_xlabel("training step")
        ax.set_ylabel("val perplexity / dense val perplexity")
        ax.set_title("relative to the dense baseline (below 1: better)",
                     fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle("LSTM-FFN-LSTM language model: dense vs MoE at equal "
                 "compute per token", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------

def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Defaults: " + ", ".join(f"{k}={v}" for k, v in DEFAULTS.items())
        + ". --quick: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()),
    )
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and two models (dense and one MoE)")
    parser.add_argument("--text", default=None,
                        help="a UTF-8 text file (default: pydoc_data.topics)")
    parser.add_argument("--out", default="lm_results",
                        help="directory for results.md, history.json and "
                             "language_model.png (default: ./lm_results)")
    parser.add_argument("--experts", default=None,
                        help="comma-separated expert counts of the MoE models")
    parser.add_argument("-k", type=int, default=None, help="experts per token")
    parser.add_argument("--expert-hidden", type=int, default=None,
                        help="hidden units of each expert (the dense "
                             "baseline has k times as many)")
    parser.add_argument("--d-model", type=int, default=None,
                        help="embedding, LSTM and MoE width")
    parser.add_argument("--vocab-size", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps per model")
    parser.add_argument("--eval-every", type=int, default=None,
                        help="steps between validation evaluations")
    parser.add_argument("--dropout", type=float, default=None)
    parser.add_argument("--learning-rate", type=float, default=None)
    parser.add_argument("--loss-coef", type=float, default=1e-2,
                        help="weight of the MoE balancing loss")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="use only the first N tokens of the text")
    parser.add_argument("--no-dense", action="store_true",
                        help="skip the dense baseline")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)

    cfg = dict(DEFAULTS, max_tokens=None)
    if args.quick:
        cfg.update(QUICK)
    for key in list(cfg) + ["loss_coef", "seed"]:
        value = getattr(args, key, None)
        if value is not None:
            cfg[key] = value
    cfg["experts"] = [int(n) for n in str(cfg["experts"]).split(",") if n]
    for n in cfg["experts"]:
        if n < cfg["k"]:
            parser.error(f"every expert count must be >= k={cfg['k']}; "
                         f"got --experts {args.experts or cfg['experts']}")
    if args.no_dense and not cfg["experts"]:
        parser.error("nothing to train: --no-dense and no --experts")
    if cfg["eval_every"] > cfg["steps"]:
        cfg["eval_every"] = cfg["steps"]
    return args, cfg


def main(argv=None):
    args, cfg = parse_args(argv)
    run_start = time.perf_counter()

    def log(message):
        print(message, flush=True)

    text = load_text(args.text)
    try:
        train, valid, words, stats = prepare_data(
            text, cfg["vocab_size"], cfg["seq_len"], cfg["max_tokens"])
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    cfg["vocab_size"] = stats["vocab_size"]
    log(f"text: {args.text or 'pydoc_data.topics'}: {stats['tokens']:,} "
        f"tokens, {stats['distinct_tokens']:,} distinct; vocabulary "
        f"{stats['vocab_size']:,} (<unk> rate on validation "
        f"{stats['unk_rate_valid']:.1%}); {stats['train_windows']:,} training "
        f"and {stats['valid_windows']:,} validation windows of "
        f"{cfg['seq_len']} tokens")
    log(f"unigram model validation perplexity: "
        f"{stats['unigram_valid_ppl']:.1f}")
    log(f"each model: {cfg['steps']} steps of {cfg['batch_size']} x "
        f"{cfg['seq_len']} tokens, d_model {cfg['d_model']}, expert hidden "
        f"{cfg['expert_hidden']}, k {cfg['k']} (dense hidden "
        f"{cfg['k'] * cfg['expert_hidden']}), loss_coef {cfg['loss_coef']}")

    runs = ([] if args.no_dense else [("dense", 1)]) + [
        ("moe", n) for n in cfg["experts"]]
    results = [train_one(kind, n, cfg, train, valid, log) for kind, n in runs]

    table = format_table(results)
    total = time.perf_counter() - run_start
    print()
    print(table)
    print()
    log(f"total time: {total:.0f} s")

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "history.json"), "w") as f:
        json.dump({"config": cfg, "data": stats, "results": results,
                   "total_seconds": total}, f, indent=1)
    figure = os.path.join(args.out, "language_model.png")
    if plot(results, stats, figure):
        log(f"figure: {figure}")
    log(f"table and history: {os.path.join(args.out, 'results.md')}, "
        f"{os.path.join(args.out, 'history.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
