"""A Transformer encoder block whose feed-forward network is a Mixture of Experts.

The block is the usual one (self-attention, then a position-wise feed-forward
network, each with a residual connection and layer normalization), except
that the feed-forward network is a ``keras_moe.MixtureOfExperts``: every
token goes to ``k`` of ``num_experts`` feed-forward experts, as in the
Switch / GShard Transformers that followed the paper.

The sequences have different lengths and are padded with id 0.
``Embedding(mask_zero=True)`` makes a padding mask that Keras passes along:
the attention ignores padded keys, the MoE layer does not route padded
positions (they reach no expert and count in neither importance nor load),
and the loss and metrics skip them.

The task (synthetic, no download, fixed seeds): for each token of a
sequence, say whether the same token id occurs anywhere else in the
sequence. A token cannot tell this alone, so the attention has to compare
it with the others.

The script trains the model with ``model.fit``, prints the per-token
accuracy next to the majority-class baseline, the MoE layer's routing
metrics from ``history.history`` (the balancing loss, CV^2 of importance and
of load, max/mean load), and checks on a padded batch that padding is not
routed.

Run it from the repository root::

    python examples/transformer_block.py            # about a minute on 2 CPU cores
    python examples/transformer_block.py --quick    # a smoke test
"""

import argparse
import os
import sys

import numpy as np

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# Before TensorFlow loads: 3 also hides the CUDA/cuInit error lines it
# prints on machines without a GPU driver.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402

import keras_moe  # noqa: E402

VOCAB = 24           # token ids 1..VOCAB; 0 is padding
MIN_LEN, MAX_LEN = 4, 16


def make_data(num_sequences, seed):
    """Returns ``(ids, labels)``: ids ``[n, MAX_LEN]`` int32 padded with 0,
    labels ``[n, MAX_LEN, 1]`` float32 (1 where the token occurs elsewhere
    in its sequence; 0 at padding, which the mask hides from the loss)."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((num_sequences, MAX_LEN), np.int32)
    labels = np.zeros((num_sequences, MAX_LEN, 1), np.float32)
    for row in range(num_sequences):
        length = rng.integers(MIN_LEN, MAX_LEN + 1)
        tokens = rng.integers(1, VOCAB + 1, size=length)
        counts = np.bincount(tokens, minlength=VOCAB + 1)
        ids[row, :length] = tokens
        labels[row, :length, 0] = counts[tokens] > 1
    return ids, labels


def encoder_block(x, num_heads, key_dim, num_experts, k, hidden, seed):
    """Self-attention + MoE feed-forward, post-norm residual block.

    The mask on ``x`` (from ``Embedding(mask_zero=True)``) reaches every
    layer: the attention masks padded keys, the MoE skips padded tokens.
    """
    dim = x.shape[-1]
    attention = keras.layers.MultiHeadAttention(
        num_heads=num_heads, key_dim=key_dim, name="self_attention")(x, x)
    x = keras.layers.LayerNormalization(name="norm_1")(
        keras.layers.Add()([x, attention]))
    moe = keras_moe.MixtureOfExperts(
        num_experts=num_experts, k=k, hidden_sizes=(hidden,), output_dim=dim,
        seed=seed, name="moe_ffn")
    x = keras.layers.LayerNormalization(name="norm_2")(
        keras.layers.Add()([x, moe(x)]))
    return x, moe


def build_model(dim, num_experts, k, seed):
    ids = keras.Input((None,), dtype="int32", name="ids")
    x = keras.layers.Embedding(VOCAB + 1, dim, mask_zero=True,
                               name="embedding")(ids)
    x, moe = encoder_block(x, num_heads=2, key_dim=dim // 2,
                           num_experts=num_experts, k=k, hidden=2 * dim,
                           seed=seed)
    outputs = keras.layers.Dense(1, activation="sigmoid", name="head")(x)
    return keras.Model(ids, outputs, name="moe_transformer"), moe


def check_padding_not_routed(model, moe, ids):
    """Routes ``ids`` through the trained block and checks that only the
    real tokens reached the experts. Returns ``(real_tokens, routed)``."""
    # The MoE layer's input: the output of the first residual + norm.
    features = keras.Model(model.input, model.get_layer("norm_1").output)
    x = features(ids)
    outputs, routing = moe(x, mask=ids != 0, return_routing=True)
    real = int(np.sum(ids != 0))
    routed = int(np.sum(routing["part_sizes"]))
    assert routed == moe.gating.k * real, (routed, real)
    padded = np.asarray(outputs)[ids == 0]
    assert np.all(padded == 0), "padding produced non-zero MoE outputs"
    return real, routed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="small data, one epoch (smoke test)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="training epochs (default 12, 1 with --quick)")
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("-k", type=int, default=2)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)

    num_train, num_val = (256, 128) if args.quick else (4096, 512)
    epochs = args.epochs or (1 if args.quick else 12)
    keras.utils.set_random_seed(args.seed)
    x_train, y_train = make_data(num_train, seed=args.seed)
    x_val, y_val = make_data(num_val, seed=args.seed + 1000)

    model, moe = build_model(args.dim, args.num_experts, args.k, args.seed)
    model.compile(optimizer=keras.optimizers.Adam(3e-3),
                  loss="binary_crossentropy", metrics=["accuracy"])
    history = model.fit(x_train, y_train, validation_data=(x_val, y_val),
                        batch_size=64, epochs=epochs,
                        verbose=0 if args.quick else 2)

    real = x_val != 0
    majority = float(max(np.mean(y_val[real]), 1 - np.mean(y_val[real])))
    logs = {key: values[-1] for key, values in history.history.items()}
    print(f"validation accuracy over real tokens: {logs['val_accuracy']:.3f} "
          f"(always guessing the majority class: {majority:.3f})")
    print(f"routing metrics of '{moe.name}' in history.history "
          f"(last epoch, training / validation):")
    for key in ("aux_loss", "importance_cv2", "load_cv2", "max_overload"):
        name = f"{moe.name}_{key}"
        print(f"  {name:24s} {logs[name]:8.4f} / {logs['val_' + name]:8.4f}")

    real_tokens, routed = check_padding_not_routed(model, moe, x_val[:8])
    print(f"padding check passed: {x_val[:8].size} positions, "
          f"{real_tokens} real tokens, {routed} (token, expert) pairs "
          f"routed = k * real tokens; padded outputs are zero")
    return 0


if __name__ == "__main__":
    sys.exit(main())
