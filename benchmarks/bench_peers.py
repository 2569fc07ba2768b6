#!/usr/bin/env python
"""Peers side by side (issue 16, point 6), in one run: keras_moe's
MixtureOfExperts against TF Model Garden's MoeLayer at equal useful FLOPs,
and keras-hub's dense MoE block against its sparsified form.

Shapes (scaled down for a CPU; the families keep the models' expert counts,
k and hidden/d ratios):
  mixtral-like  d 512, hidden 1792, 8 experts, k 2     (Mixtral 8x7B:
                4096, 14336, 8, 2)
  qwen3-like    d 512, hidden 192, 128 experts, k 8   (Qwen3-30B-A3B:
                2048, 768, 128, 8)
each in two modes, on a batch of its own:
  train_step    forward, backward and one SGD update of the layer's weights
                (loss mean(y**2) plus the layer's own losses), 4 sequences
                of 256 tokens
  serve_fwd     the inference forward, 8 sequences of 32 tokens
Everything runs under `tf.function` with 2 intra-op and 2 inter-op threads
in every process, after a warm-up, as medians over repetitions taken
round-robin (timing.py), so a change of the machine's load hits every
method of a case alike.

Model Garden (`--model-garden-python PATH`, the Python of an environment
with tf-models-official and tf_keras: benchmarks/README.md) runs in a
process of its own (model_garden_runner.py) on the same weights and
inputs (configs.make_data). Its only router, ExpertsChooseMaskedRouter,
lets each expert of a sequence take `round(capacity_factor * seq /
experts)` tokens; with capacity_factor = k that is k * tokens expert slots,
exactly the expert work of a top-k layer. Compared with it:
  ours_sparse    MixtureOfExperts(E, k, hidden_sizes=(h,)), the default
                 noisy top-k router and the exact sparse dispatch
  ours_capacity  the same with dispatch="capacity" (capacity factor 1.25 in
                 training, 2.0 in inference)
  ours_expert_choice  Model Garden's routing in ours: router="expert_choice"
                 (dispatch="capacity", capacity factor 1: each expert takes
                 tokens * k / experts tokens of the batch)
All run relu experts on the same kernels (Model Garden's have biases,
zero). Ratio: a method's time / Model Garden's time in the same
case; the useful FLOPs being equal, it is the ratio per useful FLOP.

keras-hub: a one-layer MixtralBackbone (mixtral-like) or Qwen3MoeBackbone
(qwen3-like, norm_top_k_prob=True) of the family's sizes; its MoE block
(softmax router, top k, SwiGLU experts, every expert run on every token)
is timed, then `keras_moe.integrations.keras_hub.sparsify` converts the
backbone and the block that replaced it (the same weights, each token run
by its k experts only) is timed against the first, round-robin. Ratio:
sparsified / dense; all experts against k of them would be k / E.

Useful FLOPs: the expert matmuls of tokens * k: forward 2 * tokens * k *
d * h per matrix (2 matrices, 3 with SwiGLU); a training step adds a
weight-gradient GEMM per matrix and an input-gradient GEMM for the output
matrix (2.5 times the forward; 7/3 with SwiGLU).

Targets (printed, not asserted): the best of ours below Model Garden in
every case; sparsified / dense at most 0.5 at mixtral-like and 0.2 at
qwen3-like shapes, training and serving.

Usage:
  python benchmarks/bench_peers.py [--quick] [--json PATH] [--markdown PATH]
      [--model-garden-python /work/venvs/modelgarden/bin/python]
      [--families mixtral-like,qwen3-like] [--modes train_step,serve_fwd]
      [--peers model-garden,keras-hub]

Without --model-garden-python (or when Model Garden does not import with
it) its column is skipped with a printed note, and so is the keras-hub half
without keras-hub. Progress goes to stderr, the JSON to --json, the
markdown tables to stdout (and --markdown).
"""

import argparse
import collections
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["KERAS_BACKEND"] = "tensorflow"
BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)

from configs import (  # noqa: E402
    FULL_PLAN, QUICK_PLAN, THREADS, config_seed, make_data)
from machine import (  # noqa: E402
    REPO_ROOT, environment_info, git_revision, load_average, machine_info)
from model_garden_runner import ModelGardenClient  # noqa: E402
from peers_report import markdown, targets  # noqa: E402
from progress import log  # noqa: E402
from report import fmt_s  # noqa: E402
from timing import Runnable, measure  # noqa: E402

if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

# name: d, hidden, experts, k.
FAMILIES = collections.OrderedDict([
    ("mixtral-like", dict(d=512, hidden=1792, experts=8, k=2)),
    ("qwen3-like", dict(d=512, hidden=192, experts=128, k=8)),
])
# --quick: what the tests run, seconds: the same k, fewer experts (each is
# traced), tiny matrices.
QUICK_FAMILIES = collections.OrderedDict([
    ("mixtral-like", dict(d=16, hidden=32, experts=8, k=2)),
    ("qwen3-like", dict(d=16, hidden=8, experts=16, k=8)),
])
MODES = ("train_step", "serve_fwd")
# mode: (sequences, tokens per sequence). Model Garden routes per sequence:
# seq * k must be a multiple of experts for its slots to be exactly k per
# token.
BATCHES = {"train_step": (4, 256), "serve_fwd": (8, 32)}
QUICK_BATCHES = {"train_step": (2, 16), "serve_fwd": (2, 16)}
PEERS = ("model-garden", "keras-hub")
QUICK_TIMING = dict(QUICK_PLAN, warmup=1, min_sample_s=0.005, budget_s=0.05,
                    min_reps=2, max_reps=3)
LEARNING_RATE = 1e-3
# family: keras-hub backbone, the decoder layer's attribute holding its MoE
# block (where sparsify puts the sparse one).
KERAS_HUB_BLOCKS = {"mixtral-like": ("MixtralBackbone", "_sparse_moe_block"),
                    "qwen3-like": ("Qwen3MoeBackbone", "mlp")}
KERAS_HUB_VOCABULARY = 64


def case_shape(family, mode, batches):
    sequences, seq = batches[mode]
    return dict(family, batch=sequences, seq=seq, tokens=sequences * seq)


def useful_gflop(shape, mode, glu=False):
    """The expert matmul FLOPs of tokens * k, in GFLOP."""
    matrices = 3 if glu else 2
    forward = 2.0 * matrices * shape["tokens"] * shape["k"] * shape["d"] * (
        shape["hidden"])
    if mode == "train_step":
        return forward * (2 * matrices + 1) / matrices / 1e9
    return forward / 1e9


def step_functions(layer, mode):
    """`tf.function(x)` of one mode for a Keras 3 layer (for a keras-hub
    block, which returns `(outputs, router_logits)`, of its outputs): the
    training step (forward, backward, SGD) or the inference forward."""
    import keras
    import tensorflow as tf

    def outputs(x, training):
        y = layer(x, training=training)
        return y[0] if isinstance(y, tuple) else y

    if mode == "serve_fwd":
        return tf.function(lambda x: outputs(x, False))
    optimizer = keras.optimizers.SGD(LEARNING_RATE)
    weights = layer.trainable_variables
    optimizer.build(weights)

    @tf.function
    def train_step(x):
        with tf.GradientTape() as tape:
            y = outputs(x, True)
            loss = tf.reduce_mean(tf.square(y)) + sum(layer.losses)
        optimizer.apply(tape.gradient(loss, weights), weights)
        return loss

    return train_step


def trace(runnables):
    """Calls each runnable once (the trace); {method: seconds}."""
    seconds = {}
    for r in runnables:
        start = time.perf_counter()
        r.call(1)
        seconds[r.method] = time.perf_counter() - start
    return seconds


def ratio(a, b):
    return a / b if a and b else None


def build_expert_choice(shape, data):
    """Our layer with Model Garden's routing: each expert takes its top
    `tokens * k / experts` tokens (of the whole batch; Model Garden's of
    each sequence), k * tokens slots in all, on configs.make_data's
    weights."""
    import keras_moe

    layer = keras_moe.MixtureOfExperts(
        shape["experts"], k=shape["k"], hidden_sizes=(shape["hidden"],),
        router="expert_choice", dispatch="capacity", capacity_factor=1.0,
        eval_capacity_factor=1.0, seed=1)
    layer.build((None, shape["d"]))
    layer.gating.gate_kernel.assign(data["gate_kernel"])
    layer.experts.kernels[0].assign(data["kernel_0"])
    layer.experts.kernels[1].assign(data["kernel_1"])
    return layer


def run_model_garden_case(name, family, mode, batches, plan, client):
    """Times ours and Model Garden on one (family, mode)."""
    import tensorflow as tf

    from methods import build_ours

    shape = case_shape(family, mode, batches)
    seed = config_seed("%s/%s" % (name, mode))
    key = "%s/%s" % (name, mode)
    out = {"family": name, "mode": mode, "shape": shape,
           "useful_gflop": useful_gflop(shape, mode)}
    data = make_data(shape, seed)
    x = tf.constant(data["x"].reshape(shape["batch"], shape["seq"],
                                      shape["d"]))
    layers = {"ours_sparse": build_ours(shape, data, "sparse"),
              "ours_capacity": build_ours(shape, data, "capacity"),
              "ours_expert_choice": build_expert_choice(shape, data)}
    runnables = [Runnable(method, mode, step_functions(layer, mode), (x,))
                 for method, layer in layers.items()]
    del data
    # Model Garden builds (and at the first case, imports) in its process
    # while ours trace here.
    garden = client is not None and client.error is None and (
        client.send(op="build", key=key, shape=shape, seed=seed,
                    capacity_factor=shape["k"]) is None)
    out["trace_s"] = trace(runnables)
    garden_runnable = Runnable("model_garden", mode, client=client, key=key)
    if garden and client.ready():
        res = client.receive()
        if res.get("ok"):
            out["model_garden_build_s"] = res["build_s"]
            out["model_garden_expert_slots"] = res["expert_slots"]
        else:
            garden_runnable.error = "failed: %s" % res.get("error")
            log("  model_garden %s: %s" % (key, garden_runnable.error))
    else:
        garden = False
        garden_runnable.error = "skipped: %s" % (
            client.error if client is not None
            else "no --model-garden-python")
    runnables.append(garden_runnable)
    measure([r for r in runnables if r.error is None], plan)
    out["times"] = {r.method: r.result() for r in runnables}
    if garden and garden_runnable.error is None:
        client.request(op="close", key=key)
    med = {m: t["median_s"] for m, t in out["times"].items()}
    out["useful_gflops_per_s"] = {
        m: (out["useful_gflop"] / t if t else None) for m, t in med.items()}
    out["vs_model_garden"] = {m: ratio(med[m], med["model_garden"])
                              for m in med}
    return out


def build_keras_hub_blocks(name, family, seed):
    """keras-hub's MoE block of a one-layer backbone of the family's sizes,
    and the block `sparsify` put in its place. Returns (dense, sparsified,
    backbone class name)."""
    import keras
    import keras_hub

    from keras_moe.integrations.keras_hub import sparsify

    backbone_name, attribute = KERAS_HUB_BLOCKS[name]
    d = family["d"]
    heads = max(2, d // 64)  # head_dim 64, as both models
    sizes = dict(vocabulary_size=KERAS_HUB_VOCABULARY, num_layers=1,
                 num_query_heads=heads, num_key_value_heads=max(1, heads // 4),
                 hidden_dim=d, intermediate_dim=family["hidden"],
                 num_experts=family["experts"], top_k=family["k"])
    if backbone_name == "Qwen3MoeBackbone":
        sizes.update(moe_intermediate_dim=family["hidden"],
                     norm_top_k_prob=True, head_dim=d // heads)
    keras.utils.set_random_seed(seed)
    backbone = getattr(keras_hub.models, backbone_name)(**sizes)
    decoder = backbone.transformer_layers[0]
    dense = getattr(decoder, attribute)
    sparsify(backbone)
    sparsified = getattr(decoder, attribute)
    if sparsified is dense:
        raise RuntimeError("sparsify left %s.%s in place" % (
            type(decoder).__name__, attribute))
    return dense, sparsified, backbone_name


def run_keras_hub_case(name, mode, shape, blocks, plan):
    """Times keras-hub's dense block against the sparsified one on one
    (family, mode); `blocks` is build_keras_hub_blocks' result, or an
    error message."""
    import numpy as np
    import tensorflow as tf

    out = {"family": name, "mode": mode, "shape": shape,
           "useful_gflop": useful_gflop(shape, mode, glu=True),
           "ideal_ratio": shape["k"] / shape["experts"]}
    methods = ("dense_block", "sparsified")
    if isinstance(blocks, str):
        out["times"] = {m: Runnable(m, mode).result() for m in methods}
        for t in out["times"].values():
            t["error"] = "skipped: " + blocks
        out["useful_gflops_per_s"] = dict.fromkeys(methods)
        out["sparsified_vs_dense"] = out["max_rel_diff"] = None
        return out
    rng = np.random.default_rng(config_seed("keras-hub/%s/%s" % (name,
                                                                 mode)))
    x = tf.constant(rng.standard_normal(
        (shape["batch"], shape["seq"], shape["d"]), dtype=np.float32))
    dense, sparsified = blocks[:2]
    y_dense = dense(x, training=False)[0].numpy()
    y_sparse = sparsified(x, training=False)[0].numpy()
    out["max_rel_diff"] = float(np.abs(y_sparse - y_dense).max()
                                / np.abs(y_dense).max())
    runnables = [Runnable(method, mode, step_functions(block, mode), (x,))
                 for method, block in zip(methods, (dense, sparsified))]
    out["trace_s"] = trace(runnables)
    measure(runnables, plan)
    out["times"] = {r.method: r.result() for r in runnables}
    med = {m: t["median_s"] for m, t in out["times"].items()}
    out["useful_gflops_per_s"] = {
        m: (out["useful_gflop"] / t if t else None) for m, t in med.items()}
    out["sparsified_vs_dense"] = ratio(med["sparsified"], med["dense_block"])
    return out


def run_keras_hub(families, selected, modes, batches, plan, meta):
    """The keras-hub half: the selected families and modes."""
    cases = []
    hub = meta["keras_hub"]
    try:
        import keras_hub
    except ImportError as e:
        keras_hub = None
        hub["error"] = "keras-hub not importable: %s" % e
        log("keras-hub skipped: %s" % hub["error"])
    else:
        hub["version"] = keras_hub.__version__
    for name in selected:
        blocks = hub.get("error")
        if keras_hub is not None:
            try:
                blocks = build_keras_hub_blocks(
                    name, families[name], config_seed("keras-hub/" + name))
                hub["backbones"].append(blocks[2])
            except Exception as e:  # reported, the benchmark goes on
                blocks = "%s: %s" % (type(e).__name__, e)
                hub.setdefault("failed", {})[name] = blocks
                log("  keras-hub %s failed: %s" % (name, blocks))
        for mode in modes:
            case = run_keras_hub_case(name, mode, case_shape(
                families[name], mode, batches), blocks, plan)
            cases.append(case)
            log("keras-hub %s %s: %s" % (name, mode, ", ".join(
                "%s %s" % (m, fmt_s(t["median_s"]))
                for m, t in case["times"].items())))
    return cases


def set_threads(tf):
    """THREADS intra-op and inter-op threads, or None (TensorFlow's
    defaults) where its runtime has started already (a test calling
    `main`)."""
    try:
        tf.config.threading.set_intra_op_parallelism_threads(THREADS)
        tf.config.threading.set_inter_op_parallelism_threads(THREADS)
    except RuntimeError:
        return None
    return THREADS


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes, few repetitions (what the tests run)")
    p.add_argument("--model-garden-python", default=None, metavar="PATH",
                   help="Python of an environment with tf-models-official "
                        "and tf_keras (benchmarks/README.md); without it "
                        "Model Garden is skipped")
    p.add_argument("--families", default=None,
                   help="comma-separated subset of: %s (default: all)"
                        % ", ".join(FAMILIES))
    p.add_argument("--modes", default=None,
                   help="comma-separated subset of: %s (default: both)"
                        % ", ".join(MODES))
    p.add_argument("--peers", default=None,
                   help="comma-separated subset of: %s (default: both)"
                        % ", ".join(PEERS))
    p.add_argument("--json", default=None, help="write the JSON here")
    p.add_argument("--markdown", default=None,
                   help="also write the markdown tables here")
    args = p.parse_args(argv)
    for option, known in (("families", FAMILIES), ("modes", MODES),
                          ("peers", PEERS)):
        chosen = getattr(args, option)
        chosen = list(known) if chosen is None else [
            c.strip() for c in chosen.split(",") if c.strip()]
        setattr(args, option, chosen)
        unknown = [c for c in chosen if c not in known]
        if unknown or not chosen:
            p.error("--%s takes a comma-separated subset of %s. Received: "
                    "--%s=%s" % (option, ", ".join(known), option,
                                 ",".join(chosen)))
    return args


def main(argv=None):
    args = parse_args(argv)
    start = time.time()
    load_before = load_average()
    client = None
    if args.model_garden_python and "model-garden" in args.peers:
        # Started first: its imports overlap ours.
        client = ModelGardenClient(args.model_garden_python, THREADS)
    import keras
    import tensorflow as tf

    import keras_moe

    threads = set_threads(tf)
    families = QUICK_FAMILIES if args.quick else FAMILIES
    batches = QUICK_BATCHES if args.quick else BATCHES
    plan = QUICK_TIMING if args.quick else FULL_PLAN
    garden = {"python": args.model_garden_python}
    meta = {"quick": args.quick, "threads": threads,
            "tensorflow": tf.__version__, "keras": keras.__version__,
            "keras_moe": keras_moe.__version__, "git": git_revision(),
            "machine": machine_info(), "environment": environment_info(),
            "load_before": load_before, "model_garden": garden,
            "keras_hub": {"backbones": []},
            "argv": sys.argv[1:] if argv is None else list(argv),
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    results = {"meta": meta}
    if "model-garden" in args.peers:
        results["model_garden"] = []
        try:
            for name in args.families:
                for mode in args.modes:
                    case = run_model_garden_case(
                        name, families[name], mode, batches, plan, client)
                    results["model_garden"].append(case)
                    log("%s %s: %s" % (name, mode, ", ".join(
                        "%s %s" % (m, fmt_s(t["median_s"]))
                        for m, t in case["times"].items())))
        finally:
            if client is not None:
                client.close()
        if client is None:
            garden["error"] = "no --model-garden-python given"
        elif client.versions is not None:
            garden["versions"] = client.versions
        else:
            garden["error"] = client.error
        if "error" in garden:
            log("Model Garden skipped: %s" % garden["error"])
    if "keras-hub" in args.peers:
        results["keras_hub"] = run_keras_hub(
            families, args.families, args.modes, batches, plan, meta)
    results["targets"] = targets(results)
    meta["load_after"] = load_average()
    meta["wall_s"] = time.time() - start
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
            f.write("\n")
    text = markdown(results)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
