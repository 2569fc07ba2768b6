"""How long the first `fit` takes, and how large the traced training graph
is, as the number of experts grows (issue 14, point 4).

Each configuration runs in a fresh Python process, so that no trace cache
or Keras state carries over: `Input(16) -> layer -> Dense(1)`, compiled
with "adam" and "mse", fitted on one batch of 256 synthetic rows. The layer
is `MixtureOfExperts(E, k=2, hidden_sizes=(16,), dispatch=D)` (flat) or
`HierarchicalMixtureOfExperts(G, N, k=2, group_k=2, hidden_sizes=(16,))`.
Reported per configuration:

- `build`: building the layer and the model and compiling it, before
  `fit` (creating and initializing the experts' weights);
- `first fit`: the wall time of the first `model.fit` (one epoch, one
  step): tracing the training step, running it once, and fit's set-up;
- `later epoch`: the median wall time of the epochs of a second `fit`
  (3 epochs, timed by a callback), the step with its trace done;
- `graph nodes`: the nodes of the traced training function's graph and of
  every function in its library (the `one_step_on_data` step it calls,
  loop bodies and conditions, gradient functions), constants and inputs
  included; `functions`: how many functions that library holds.

How the graph is found on Keras 3.15 (TensorFlow backend): after `fit`,
`model.train_function` is a plain Python function whose closure holds
`multi_step_on_iterator`, the `tf.function` that `fit` called with its
data iterator. Its one traced concrete function
(`_list_all_concrete_functions()`, a private TensorFlow method: the public
`get_concrete_function` would need `fit`'s own iterator type) gives
`graph.as_graph_def()`, whose `library` holds every nested function. The
run fails loudly if a Keras or TensorFlow upgrade moves any of this.

The issue's targets, on 2 cores, measured within this one run and printed
with whether each is met (information, not assertions):
`first_fit(1024 experts) / first_fit(16 experts) <= 2` for each flat
dispatch, and the hierarchical 64x64 layer's first fit under 30 s.
`--quick` runs smaller sizes (flat 40 and 200 experts, both past
`grouped_feed_forward.MAX_UNROLLED_GROUPS`, and hierarchical 2x2) and
prints the same lines for them.

    python benchmarks/bench_tracing.py                 # full: 10+ minutes
    python benchmarks/bench_tracing.py --quick         # under a minute
    python benchmarks/bench_tracing.py --configs sparse-16,sparse-1024
    python benchmarks/bench_tracing.py --json out.json --timeout 900

A configuration that runs past `--timeout` seconds (default 900) is
killed and reported as "timed out". The run records the CPU, oneDNN on or
off, the TensorFlow, Keras and keras_moe versions, the environment
settings of benchmarks/machine.py, and the load average before and after
each configuration (other processes on the machine slow tracing too).
Progress lines go to stderr, the JSON to `--json`, the tables to stdout.
"""

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)
from configs import THREADS  # noqa: E402
from machine import (  # noqa: E402
    REPO_ROOT, environment_info, git_revision, load_average, machine_info)
from report import fmt_s  # noqa: E402

if REPO_ROOT not in sys.path:
    sys.path.append(REPO_ROOT)

TOKENS, D, HIDDEN, K, GROUP_K = 256, 16, 16, 2, 2
LATER_EPOCHS = 3
DISPATCHES = ("sparse", "capacity")


def _flat(dispatch, experts):
    return ("%s-%d" % (dispatch, experts),
            {"layer": "flat", "dispatch": dispatch, "experts": experts})


def _hierarchical(groups, per_group):
    return ("hierarchical-%dx%d" % (groups, per_group),
            {"layer": "hierarchical", "dispatch": "sparse",
             "groups": groups, "experts_per_group": per_group,
             "experts": groups * per_group})


def _configs(flat_sizes, hierarchical_sizes):
    return collections.OrderedDict(
        [_flat(d, e) for d in DISPATCHES for e in flat_sizes]
        + [_hierarchical(g, n) for g, n in hierarchical_sizes])


# The flat layer's numbers of experts (each with both dispatches), and the
# hierarchical layer's (groups, experts per group).
FULL_FLAT, FULL_HIERARCHICAL = (16, 256, 1024, 4096), ((8, 8), (32, 32),
                                                      (64, 64))
QUICK_FLAT, QUICK_HIERARCHICAL = (40, 200), ((2, 2),)
CONFIGS = _configs(FULL_FLAT, FULL_HIERARCHICAL)
QUICK_CONFIGS = _configs(QUICK_FLAT, QUICK_HIERARCHICAL)
ALL_CONFIGS = {**CONFIGS, **QUICK_CONFIGS}
# (experts in the numerator, in the denominator, limit); the hierarchical
# configuration and its limit in seconds.
FULL_TARGETS = {"ratio": (1024, 16, 2.0),
                "hierarchical": ("hierarchical-64x64", 30.0)}
QUICK_TARGETS = {"ratio": (200, 40, 2.0),
                 "hierarchical": ("hierarchical-2x2", 30.0)}


def log(msg):
    print("[bench_tracing] %s" % msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# One configuration, in its own process (--worker).
# ---------------------------------------------------------------------------


def train_graph_size(model):
    """(nodes, functions) of the training function that `fit` traced: the
    nodes of its graph and of all functions in its library."""
    fn = model.train_function
    cells = dict(zip(fn.__code__.co_freevars,
                     (c.cell_contents for c in fn.__closure__ or ())))
    traced = cells.get("multi_step_on_iterator")
    if traced is None or not hasattr(traced, "_list_all_concrete_functions"):
        raise RuntimeError(
            "model.train_function no longer holds the tf.function "
            "`multi_step_on_iterator` (Keras changed): update "
            "bench_tracing.train_graph_size. Closure: %s" % sorted(cells))
    concrete = traced._list_all_concrete_functions()
    if len(concrete) != 1:
        raise RuntimeError("expected one trace of the training function, "
                           "found %d" % len(concrete))
    graph = concrete[0].graph.as_graph_def()
    library = graph.library.function
    nodes = len(graph.node) + sum(len(f.node_def) for f in library)
    return nodes, len(library)


def run_worker(name, spec):
    """Builds, fits and measures one configuration; its results."""
    import resource

    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(THREADS)
    tf.config.threading.set_inter_op_parallelism_threads(THREADS)
    import keras

    import keras_moe
    from reference_harness import cpu_settings

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((TOKENS, D)).astype("float32")
    y = rng.standard_normal((TOKENS, 1)).astype("float32")

    start = time.perf_counter()
    if spec["layer"] == "flat":
        layer = keras_moe.MixtureOfExperts(
            spec["experts"], k=K, hidden_sizes=(HIDDEN,),
            dispatch=spec["dispatch"])
    else:
        layer = keras_moe.HierarchicalMixtureOfExperts(
            spec["groups"], spec["experts_per_group"], k=K, group_k=GROUP_K,
            hidden_sizes=(HIDDEN,))
    inputs = keras.Input((D,))
    model = keras.Model(inputs, keras.layers.Dense(1)(layer(inputs)))
    model.compile("adam", "mse")
    build_s = time.perf_counter() - start

    start = time.perf_counter()
    model.fit(x, y, batch_size=TOKENS, epochs=1, verbose=0)
    first_fit_s = time.perf_counter() - start

    class EpochTimes(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.times.append(time.perf_counter() - self.start)

    epochs = EpochTimes()
    epochs.times = []
    model.fit(x, y, batch_size=TOKENS, epochs=LATER_EPOCHS, verbose=0,
              callbacks=[epochs])
    nodes, functions = train_graph_size(model)
    return dict(
        spec, name=name, build_s=build_s, first_fit_s=first_fit_s,
        later_epoch_s=statistics.median(epochs.times),
        graph_nodes=nodes, functions=functions,
        max_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        settings={"cpu": cpu_settings.describe(),
                  "tensorflow": tf.__version__, "keras": keras.__version__,
                  "keras_moe": keras_moe.__version__})


RESULT_PREFIX = "BENCH_TRACING_RESULT "


def worker_main(name):
    spec = ALL_CONFIGS[name]
    print(RESULT_PREFIX + json.dumps(run_worker(name, spec)), flush=True)


# ---------------------------------------------------------------------------
# The run: one subprocess per configuration.
# ---------------------------------------------------------------------------


def run_config(name, timeout):
    """Runs one configuration in a fresh process; its results, with
    `status` "ok", "timed out" or "failed"."""
    load_before = load_average()
    start = time.time()
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name]
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        res = {"status": "timed out"}
    else:
        lines = [l for l in proc.stdout.splitlines()
                 if l.startswith(RESULT_PREFIX)]
        if proc.returncode == 0 and lines:
            res = dict(json.loads(lines[-1][len(RESULT_PREFIX):]),
                       status="ok")
        else:
            res = {"status": "failed", "returncode": proc.returncode,
                   "stderr_tail": proc.stderr[-3000:]}
    res = dict(ALL_CONFIGS[name], **res)
    res.update(name=name, wall_s=time.time() - start,
               load_before=load_before, load_after=load_average())
    return res


def targets(results, quick):
    """The issue's two targets from this run: [{name, value, limit,
    met}], value None where a configuration is missing or did not
    finish."""
    spec = QUICK_TARGETS if quick else FULL_TARGETS
    configs = results["configs"]

    def first_fit(name):
        return configs.get(name, {}).get("first_fit_s")

    rows = []
    big, small, limit = spec["ratio"]
    for dispatch in DISPATCHES:
        num, den = (first_fit("%s-%d" % (dispatch, e)) for e in (big, small))
        value = num / den if num and den else None
        rows.append({"name": "first fit %s: %d experts / %d experts" % (
            dispatch, big, small), "value": value, "limit": limit,
            "unit": "ratio", "met": None if value is None else value <= limit})
    name, limit = spec["hierarchical"]
    value = first_fit(name)
    rows.append({"name": "first fit %s" % name, "value": value,
                 "limit": limit, "unit": "s",
                 "met": None if value is None else value < limit})
    return rows


def _loads(v):
    return "—" if v is None else "/".join("%.2f" % x for x in v)


def markdown(results):
    meta = results["meta"]
    m, s = meta["machine"], meta.get("settings") or {}
    lines = [
        "Machine: %s CPUs, %s GiB; %s; TensorFlow %s, Keras %s, keras_moe %s "
        "(%s); %d intra-op / %d inter-op threads; started %s." % (
            m.get("nproc"), m.get("mem_total_gib"),
            s.get("cpu", "CPU: %s" % m.get("cpu_model", "?")),
            s.get("tensorflow", "?"), s.get("keras", "?"),
            s.get("keras_moe", "?"), meta.get("git") or "no git",
            THREADS, THREADS, meta["started"]),
        "Environment: %s." % (", ".join(
            "`%s=%s`" % kv for kv in sorted(meta["environment"].items()))
            or "TensorFlow's defaults"),
        "Load average (1, 5, 15 min) before %s, after %s; wall %.0f s." % (
            _loads(meta["load_before"]), _loads(meta["load_after"]),
            meta["wall_s"]),
        "",
        "| configuration | layer | dispatch | experts | build | first fit "
        "| later epoch | graph nodes | functions | load (1 min) before / "
        "after |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results["configs"].items():
        ok = r["status"] == "ok"
        cells = [name, r["layer"], r["dispatch"], r["experts"],
                 fmt_s(r["build_s"]) if ok else "—",
                 fmt_s(r["first_fit_s"]) if ok else r["status"],
                 fmt_s(r["later_epoch_s"]) if ok else "—",
                 r["graph_nodes"] if ok else "—",
                 r["functions"] if ok else "—",
                 "%.2f / %.2f" % (r["load_before"][0], r["load_after"][0])
                 if r["load_before"] and r["load_after"] else "—"]
        lines.append("| %s |" % " | ".join(str(c) for c in cells))
    lines += ["", "Targets (issue 14; information, not assertions):", ""]
    for t in results["targets"]:
        value = ("—" if t["value"] is None else "%.2f%s" % (
            t["value"], " s" if t["unit"] == "s" else ""))
        limit = ("<= %.1f" % t["limit"] if t["unit"] == "ratio"
                 else "< %.0f s" % t["limit"])
        met = {True: "met", False: "not met", None: "not measured"}[t["met"]]
        lines.append("- target: %s = %s (%s): %s" % (
            t["name"], value, limit, met))
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="small sizes: %s" % ", ".join(QUICK_CONFIGS))
    parser.add_argument("--configs",
                        help="comma-separated configurations (default: all "
                             "of the run): %s" % ", ".join(CONFIGS))
    parser.add_argument("--json", help="write the JSON results here")
    parser.add_argument("--timeout", type=float, default=900,
                        help="seconds per configuration (default 900)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    known = QUICK_CONFIGS if args.quick else CONFIGS
    args.selected = (args.configs.split(",") if args.configs
                     else list(known))
    unknown = [c for c in args.selected if c not in ALL_CONFIGS]
    if unknown:
        parser.error("unknown configurations %s; known: %s" % (
            unknown, ", ".join(ALL_CONFIGS)))
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return 0
    start = time.time()
    meta = {"quick": args.quick, "threads": THREADS, "timeout_s": args.timeout,
            "git": git_revision(), "machine": machine_info(),
            "environment": environment_info(), "load_before": load_average(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "argv": sys.argv[1:] if argv is None else argv}
    log("load average before: %s" % _loads(meta["load_before"]))
    results = {"meta": meta, "configs": collections.OrderedDict()}
    for name in args.selected:
        res = run_config(name, args.timeout)
        results["configs"][name] = res
        if res["status"] == "ok":
            meta.setdefault("settings", res.pop("settings"))
            log("%s: first fit %s, later epoch %s, %d graph nodes, "
                "%d functions" % (name, fmt_s(res["first_fit_s"]),
                                  fmt_s(res["later_epoch_s"]),
                                  res["graph_nodes"], res["functions"]))
        else:
            log("%s: %s after %.0f s%s" % (
                name, res["status"], res["wall_s"],
                "\n" + res["stderr_tail"] if "stderr_tail" in res else ""))
    meta["load_after"] = load_average()
    meta["wall_s"] = time.time() - start
    results["targets"] = targets(results, args.quick)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print(markdown(results))
    # A configuration past --timeout is a result; one that failed is not.
    return 1 if any(r["status"] == "failed"
                    for r in results["configs"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
