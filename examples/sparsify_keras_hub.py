"""Sparsify a keras-hub MoE language model: each token runs its top-k
experts only.

keras-hub's Mixtral, Qwen-MoE and Qwen3-MoE blocks run every expert on every
token. ``keras_moe.integrations.keras_hub.sparsify`` converts a model in
place so that keras_moe's ``MixtureOfExperts`` runs each MoE block with the
same weights, each token through its k chosen experts only.

The script

1. builds a small randomly initialized Qwen3-MoE (or, with
   ``--model mixtral``, Mixtral) causal language model with keras-hub (no
   download, fixed seeds), and a copy of it with the same weights,
2. sparsifies the copy and checks that both give the same logits on a
   padded batch, and the same balancing loss while training,
3. trains the sparse model a few steps with ``fit`` on synthetic token
   sequences (each token follows from the one before by a fixed rule),
4. generates greedily from a prompt with the trained sparse model, and
   checks that keras-hub's model given the trained weights generates the
   same tokens.

It exits with a non-zero status if a check fails. Run it from the repository
root (needs keras-hub: ``pip install "keras_moe[keras_hub]"``)::

    python examples/sparsify_keras_hub.py                  # seconds
    python examples/sparsify_keras_hub.py --model mixtral
    python examples/sparsify_keras_hub.py --quick          # fewer steps
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
import keras_hub  # noqa: E402

from keras_moe.integrations.keras_hub import sparsify  # noqa: E402

VOCABULARY_SIZE = 97
SEQUENCE_LENGTH = 16
NUM_EXPERTS = 8
TOP_K = 2

MODELS = {
    "qwen3_moe": (
        keras_hub.models.Qwen3MoeBackbone, keras_hub.models.Qwen3MoeCausalLM,
        dict(moe_intermediate_dim=32, head_dim=16, norm_top_k_prob=True),
    ),
    "mixtral": (
        keras_hub.models.MixtralBackbone, keras_hub.models.MixtralCausalLM,
        dict(),
    ),
}


def build(model_name):
    """A small random keras-hub causal LM (no preprocessor: token ids in)."""
    backbone_class, causal_lm_class, extra = MODELS[model_name]
    keras.utils.set_random_seed(0)
    backbone = backbone_class(
        vocabulary_size=VOCABULARY_SIZE, num_layers=2, num_query_heads=4,
        num_key_value_heads=2, hidden_dim=64, intermediate_dim=128,
        num_experts=NUM_EXPERTS, top_k=TOP_K, **extra)
    return causal_lm_class(backbone=backbone, preprocessor=None)


def copy_of(causal_lm):
    """A keras-hub model of the same class, config and weights."""
    backbone = causal_lm.backbone
    copy = type(backbone).from_config(backbone.get_config())
    copy.set_weights(backbone.get_weights())
    return type(causal_lm)(backbone=copy, preprocessor=None)


def make_sequences(num_sequences, seed):
    """Token sequences where each token follows from the previous one
    (``t -> 5 t + 3 mod V``, never 0, the padding id), from random
    starts; the last few tokens of some sequences padded."""
    rng = np.random.default_rng(seed)
    tokens = np.empty((num_sequences, SEQUENCE_LENGTH), "int32")
    tokens[:, 0] = rng.integers(1, VOCABULARY_SIZE, num_sequences)
    for i in range(1, SEQUENCE_LENGTH):
        tokens[:, i] = (5 * tokens[:, i - 1] + 3) % (VOCABULARY_SIZE - 1) + 1
    lengths = rng.integers(SEQUENCE_LENGTH // 2, SEQUENCE_LENGTH + 1,
                           num_sequences)
    padding_mask = (np.arange(SEQUENCE_LENGTH) < lengths[:, None])
    tokens = np.where(padding_mask, tokens, 0).astype("int32")
    return {"token_ids": tokens, "padding_mask": padding_mask.astype("int32")}


def max_difference(a, b, mask):
    a = keras.ops.convert_to_numpy(a)
    b = keras.ops.convert_to_numpy(b)
    return float(np.abs(a - b)[mask.astype(bool)].max())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS),
                        default="qwen3_moe")
    parser.add_argument("--quick", action="store_true",
                        help="fewer training steps (a smoke test)")
    args = parser.parse_args()
    failures = []

    keras_hub_lm = build(args.model)
    lm = sparsify(copy_of(keras_hub_lm))
    block = lm.backbone.transformer_layers[0]
    block = getattr(block, "mlp", None) or block._sparse_moe_block
    print(f"{args.model}: {lm.backbone.count_params():,} parameters, the "
          f"same as keras-hub's ({keras_hub_lm.backbone.count_params():,})")
    print(f"MoE blocks: {type(block).__name__}; each token runs {TOP_K} of "
          f"{NUM_EXPERTS} experts (keras-hub's block runs all "
          f"{NUM_EXPERTS}: {NUM_EXPERTS // TOP_K}x the expert matmuls)")

    # 1. The same logits (at unpadded positions) and balancing loss.
    batch = make_sequences(4, seed=1)
    difference = max_difference(lm(batch), keras_hub_lm(batch),
                                batch["padding_mask"])
    print(f"max |logits - keras-hub's logits| (unpadded tokens): "
          f"{difference:.2e}")
    if difference > 1e-4:
        failures.append("logits differ")
    lm(batch, training=True)
    keras_hub_lm(batch, training=True)
    loss, expected_loss = (float(sum(model.losses))
                           for model in (lm, keras_hub_lm))
    print(f"balancing loss while training: {loss:.6f} (keras-hub's: "
          f"{expected_loss:.6f})")
    if abs(loss - expected_loss) > 1e-5 * max(1.0, abs(expected_loss)):
        failures.append("balancing losses differ")

    # 2. Training: fit as with any keras-hub CausalLM.
    data = make_sequences(256, seed=2)
    targets = np.roll(data["token_ids"], -1, axis=1)
    weights = np.roll(data["padding_mask"], -1, axis=1)
    weights[:, -1] = 0
    lm.compile(optimizer=keras.optimizers.Adam(3e-3), sampler="greedy",
               weighted_metrics=["sparse_categorical_accuracy"])
    epochs = 2 if args.quick else 6
    # (keras-hub makes a tf.data pipeline of the arrays, which `fit` does
    # not shuffle; the sequences are in random order already.)
    history = lm.fit(data, targets, sample_weight=weights, batch_size=32,
                     epochs=epochs, shuffle=False, verbose=0)
    losses = history.history["loss"]
    accuracy = history.history["sparse_categorical_accuracy"][-1]
    print(f"fit: loss {losses[0]:.3f} -> {losses[-1]:.3f} over {epochs} "
          f"epochs, next-token accuracy {accuracy:.2f}")
    if not losses[-1] < losses[0]:
        failures.append("training did not lower the loss")

    # 3. Generation, and keras-hub's model with the trained weights.
    prompt = {"token_ids": np.zeros((1, SEQUENCE_LENGTH), "int32"),
              "padding_mask": np.zeros((1, SEQUENCE_LENGTH), "int32")}
    prompt["token_ids"][0, :3] = data["token_ids"][0, :3]
    prompt["padding_mask"][0, :3] = 1
    generated = lm.generate(prompt, stop_token_ids=None)["token_ids"][0]
    print(f"generated: {generated.tolist()}")
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"),
                        "sparsify_keras_hub.weights.h5")
    lm.backbone.save_weights(path)  # keras-hub's layout: loads into either
    keras_hub_lm.backbone.load_weights(path)
    os.remove(path)
    keras_hub_lm.compile(sampler="greedy")
    expected = keras_hub_lm.generate(prompt, stop_token_ids=None)
    if (expected["token_ids"][0] == generated).all():
        print("keras-hub's model with these weights generates the same "
              "tokens")
    else:
        failures.append("keras-hub's model generates other tokens: "
                        f"{expected['token_ids'][0].tolist()}")

    if failures:
        print("FAILED: " + "; ".join(failures))
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
