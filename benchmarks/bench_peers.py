#!/usr/bin/env python
"""Peers side by side (issue 16, point 6): keras_moe's MixtureOfExperts
against TF Model Garden's MoeLayer at equal useful FLOPs, and keras-hub's
dense MoE block against its sparsified form, in one run.

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
All three run relu experts on the same kernels (Model Garden's have
biases, zero). Useful FLOPs (the same for all three, so the ratio of times
is the ratio per useful FLOP): the expert matmuls of tokens * k, forward
4 * tokens * k * d * h, a training step 2.5 times that (each forward GEMM
has a weight-gradient GEMM, the second layer an input-gradient one).

Ratios: a method's time / Model Garden's time (same case); below 1 is
ahead. Targets (printed, not asserted): the best of ours below 1 in every
case.

Usage:
  python benchmarks/bench_peers.py [--quick] [--json PATH] [--markdown PATH]
      [--model-garden-python /work/venvs/modelgarden/bin/python]
      [--families mixtral-like,qwen3-like]

Without --model-garden-python (or when Model Garden does not import with
it) its column is skipped with a printed note. Progress goes to stderr, the
JSON to --json, the markdown tables to stdout (and --markdown).
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
from progress import log  # noqa: E402
from report import fmt_r, fmt_s  # noqa: E402
from timing import Runnable, measure  # noqa: E402

if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

# name: d, hidden, experts, k.
FAMILIES = collections.OrderedDict([
    ("mixtral-like", dict(d=512, hidden=1792, experts=8, k=2)),
    ("qwen3-like", dict(d=512, hidden=192, experts=128, k=8)),
])
# --quick: what the tests run, seconds; the same k and the same experts
# per token share, tiny matrices.
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
MODEL_GARDEN_METHODS = ("ours_sparse", "ours_capacity", "model_garden")
QUICK_TIMING = dict(QUICK_PLAN, warmup=1, min_sample_s=0.005, budget_s=0.05,
                    min_reps=2, max_reps=3)
LEARNING_RATE = 1e-3


def case_shape(family, mode, batches):
    sequences, seq = batches[mode]
    return dict(family, batch=sequences, seq=seq, tokens=sequences * seq)


def useful_gflop(shape, mode):
    """The expert matmul FLOPs of tokens * k, in GFLOP."""
    flops = 4.0 * shape["tokens"] * shape["k"] * shape["d"] * shape["hidden"]
    return flops * (2.5 if mode == "train_step" else 1.0) / 1e9


def step_functions(layer, mode):
    """`tf.function(x)` of one mode for a Keras 3 layer: the training step
    (forward, backward, SGD) or the inference forward."""
    import keras
    import tensorflow as tf

    if mode == "serve_fwd":
        return tf.function(lambda x: layer(x, training=False))
    optimizer = keras.optimizers.SGD(LEARNING_RATE)
    weights = layer.trainable_variables
    optimizer.build(weights)

    @tf.function
    def train_step(x):
        with tf.GradientTape() as tape:
            y = layer(x, training=True)
            loss = tf.reduce_mean(tf.square(y)) + tf.add_n(layer.losses)
        optimizer.apply(tape.gradient(loss, weights), weights)
        return loss

    return train_step


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
    runnables = []
    for method, dispatch in (("ours_sparse", "sparse"),
                             ("ours_capacity", "capacity")):
        layer = build_ours(shape, data, dispatch)
        runnables.append(Runnable(method, mode, step_functions(layer, mode),
                                  (x,)))
    del data
    # Model Garden builds (and at the first case, imports) in its process
    # while ours trace here.
    garden = client is not None and client.error is None and (
        client.send(op="build", key=key, shape=shape, seed=seed,
                    capacity_factor=shape["k"]) is None)
    out["trace_s"] = {}
    for r in runnables:
        start = time.perf_counter()
        r.call(1)
        out["trace_s"][r.method] = time.perf_counter() - start
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
    out["vs_model_garden"] = {
        m: (med[m] / med["model_garden"]
            if med[m] and med["model_garden"] else None) for m in med}
    return out


def model_garden_targets(cases):
    rows = []
    for case in cases:
        ours = {m: case["vs_model_garden"][m]
                for m in ("ours_sparse", "ours_capacity")
                if case["vs_model_garden"][m] is not None}
        best = min(ours, key=ours.get) if ours else None
        value = ours.get(best)
        rows.append({
            "target": "ours / Model Garden per useful FLOP, %s, %s" % (
                case["family"], case["mode"]),
            "value": value, "limit": 1.0,
            "met": None if value is None else bool(value < 1.0),
            "note": "best: %s" % best if best else "Model Garden skipped"})
    return rows


def markdown(results):
    meta = results["meta"]
    m = meta["machine"]
    lines = []
    a = lines.append
    a("# Peers%s" % (" (--quick: tiny shapes)" if meta["quick"] else ""))
    a("")
    threads = meta["threads"]
    a("Machine: %s CPUs (%s), %s GiB; TensorFlow %s, Keras %s, keras_moe %s "
      "(%s); %s; started %s." % (
          m.get("nproc"), m.get("cpu_model", "?"), m.get("mem_total_gib"),
          meta["tensorflow"], meta["keras"], meta["keras_moe"],
          meta.get("git") or "no git",
          "%d intra-op / %d inter-op threads" % (threads, threads)
          if threads else "TensorFlow's default threads", meta["started"]))
    a("Load average (1, 5, 15 min) before %s, after %s; wall %.0f s." % tuple(
        ["/".join("%.2f" % v for v in (meta[k] or ()))
         for k in ("load_before", "load_after")] + [meta["wall_s"]]))
    env = meta["environment"]
    a("Environment: %s." % (", ".join("`%s=%s`" % kv for kv in sorted(
        env.items())) or "TensorFlow's defaults"))
    garden = meta["model_garden"]
    if garden.get("versions"):
        a("Model Garden: tf-models-official %(tf_models_official)s on "
          "tf_keras %(tf_keras)s (TensorFlow %(tensorflow)s), " % garden[
              "versions"] + "`%s`." % garden["python"])
    else:
        a("")
        a("**Model Garden skipped: %s.**" % garden["error"])
    a("")
    a("## keras_moe against Model Garden's MoeLayer (equal useful FLOPs)")
    a("")
    a("Time per call (median); in brackets useful GFLOP/s; ÷MG = time / "
      "Model Garden's time.")
    a("")
    a("| shape | mode | tokens | useful GFLOP | ours_sparse | ÷MG "
      "| ours_capacity | ÷MG | model_garden |")
    a("|---|---|---|---|---|---|---|---|---|")
    for case in results["model_garden"]:
        s = case["shape"]
        cells = []
        for method in MODEL_GARDEN_METHODS:
            t = case["times"][method]
            cell = (fmt_s(t["median_s"]) + " (%.1f)" % case[
                "useful_gflops_per_s"][method]) if t["median_s"] else (
                t.get("error", "—").split(":")[0])
            cells.append(cell)
            if method != "model_garden":
                cells.append(fmt_r(case["vs_model_garden"][method]))
        a("| %s (d %d, h %d, E %d, k %d) | %s | %d | %.3g | %s |" % (
            case["family"], s["d"], s["hidden"], s["experts"], s["k"],
            case["mode"], s["tokens"], case["useful_gflop"],
            " | ".join(cells)))
    a("")
    a("## Targets (issue 16; information, not assertions)")
    a("")
    a("| target | value | limit | met |")
    a("|---|---|---|---|")
    for t in results["targets"]:
        a("| %s (%s) | %s | < %s | %s |" % (
            t["target"], t["note"], fmt_r(t["value"]), t["limit"],
            "—" if t["met"] is None else ("yes" if t["met"] else "no")))
    return "\n".join(lines) + "\n"


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
    p.add_argument("--json", default=None, help="write the JSON here")
    p.add_argument("--markdown", default=None,
                   help="also write the markdown tables here")
    args = p.parse_args(argv)
    args.families = (list(FAMILIES) if args.families is None else
                     [f.strip() for f in args.families.split(",")
                      if f.strip()])
    unknown = [f for f in args.families if f not in FAMILIES]
    if unknown or not args.families:
        p.error("--families takes a comma-separated subset of %s. "
                "Received: --families=%s" % (", ".join(FAMILIES),
                                             ",".join(unknown)))
    return args


def main(argv=None):
    args = parse_args(argv)
    start = time.time()
    load_before = load_average()
    client = None
    if args.model_garden_python:
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
            "argv": sys.argv[1:] if argv is None else list(argv),
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    results = {"meta": meta, "model_garden": []}
    try:
        for name in args.families:
            family = families[name]
            for mode in MODES:
                case = run_model_garden_case(name, family, mode, batches,
                                             plan, client)
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
    results["targets"] = model_garden_targets(results["model_garden"])
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
