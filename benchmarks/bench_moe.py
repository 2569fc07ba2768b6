#!/usr/bin/env python
"""Benchmark of keras_moe's MixtureOfExperts against the original, a peer,
an oracle and the machine's roofline (issue 5).

Everything is timed in one run, inside `tf.function`, with 2 intra-op and 2
inter-op threads, after a warm-up, as the median over repetitions. The
methods of one configuration are timed round-robin (one sample of each in
turn), so a change of the machine's load hits all of them alike.

Methods (all with the same weights, inputs and routing):
  sparse        MixtureOfExperts(dispatch="sparse"), the exact dispatch
  capacity      MixtureOfExperts(dispatch="capacity", capacity_factor=1.25,
                eval_capacity_factor=2.0) under tf.function
  capacity_xla  the same layer under tf.function(jit_compile=True)
  original      the original LocalMixtureOfExperts, tf.compat.v1 graph and
                Session (intra/inter-op 2), in a separate process
  dense_all     the peer: every expert on every token (einsum over all
                experts, weighted by the gates)
  oracle        one dense FFN of the expert's shape (d -> hidden -> d, relu,
                no bias) on one contiguous [tokens * k, d] batch

Modes: train_fwd and train_fwd_bwd (training mode; the backward pass takes
the gradients of all weights of loss = sum(y**2) + aux loss) and infer_fwd
(inference mode). The oracle has no modes: its forward serves train_fwd and
infer_fwd, its forward + backward (gradients of both kernels) train_fwd_bwd.

Ratios:
  R_oracle    time / oracle time (same mode)
  R_roofline  time / max(useful FLOPs / GEMM rate,
                         expert-weight bytes / read bandwidth)
              useful FLOPs: forward 4 * tokens * k * d * hidden (the
              oracle's); forward + backward 2.5x that (the backward needs 3
              GEMMs of the forward's 2: dW2, dh, dW1; no input gradient).
              Weight bytes: the active experts' (those that receive a token)
              kernels, read once forward; forward + backward 2.5x (W1, W2
              read forward, W2 read for dh, dW1 and dW2 written).
              GEMM rate: a large square float32 matmul; read bandwidth: a
              reduce_sum over a large array; both measured in this run,
              round-robin with each configuration's methods (that
              configuration's roofline), and at the start and the end.
  vs_original time / the original's time (same mode)

Memory: at the large configuration, a forward + backward step of each of
sparse, capacity, capacity_xla, oracle and original, each in its own
process (forked before TensorFlow starts its runtime): after building, a
first step; then the peak-RSS mark is reset (/proc/self/clear_refs) and
`ru_maxrss` after a second step minus the RSS before it is the step's peak
memory. glibc's dynamic mmap threshold is pinned (mallopt) so freed large
tensors leave the RSS. Where the mark cannot be reset, the first step's
`ru_maxrss` delta is used.

Scaling: tokens, d, hidden and k fixed; forward + backward over 4, 16, 64
and 256 experts for sparse, capacity, capacity_xla and original; prints
cost(256) / cost(16).

The original runs in a Session with 2 intra-op and 2 inter-op threads and
Grappler on, except its dependency optimizer, which would drop the
stateless ops behind the fetched tf.group (nothing would run).

Usage:
  python benchmarks/bench_moe.py [--quick] [--json PATH] [--markdown PATH]
                                 [--configs large,serving,scaling,memory]
                                 [--original PATH]
  python benchmarks/bench_moe.py --profile small-batch[:sparse[:train_fwd_bwd]]

Progress goes to stderr, one line per configuration; the JSON goes to --json
(or stdout) and a markdown table to stdout (and --markdown). The targets of
issue 5 are printed with whether each is met, as information only.

This script runs one configuration (`run_config`), the scaling sweep and
`main`; the modules beside it hold the rest: configs.py (configurations,
inputs, command line), methods.py (our layers, the peer, the oracle),
original_runner.py (the original's worker; the only user of the
reference harness, reference_harness/), timing.py, peak_memory.py, op_profile.py, report.py,
machine.py and progress.py.
"""

import collections
import gc
import json
import math
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["KERAS_BACKEND"] = "tensorflow"

# keras_moe from this checkout, and tests/ for original_runner.py.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import numpy as np  # noqa: E402

from configs import (  # noqa: E402
    CAPACITY_FACTOR, CONFIGS, DENSE_MAX_BYTES, EVAL_CAPACITY_FACTOR,
    FULL_PLAN, MEMORY_CONFIG, METHODS, MODE_LABELS, QUICK_CONFIGS,
    QUICK_PLAN, QUICK_SCALING, SCALING, SCALING_METHODS, THREADS,
    config_seed, make_data, parse_args, shape_dict)
from machine import (  # noqa: E402
    environment_info, git_revision, load_average, machine_info)
from methods import (  # noqa: E402
    build_ours, dense_functions, oracle_functions, ours_functions)
from op_profile import format_profile, profile  # noqa: E402
from original_runner import OriginalClient, find_original  # noqa: E402
from peak_memory import (  # noqa: E402
    fork_memory_child, join_memory_child, log_memory, memory_methods,
    memory_results)
from progress import START, log  # noqa: E402
from report import fmt_r, fmt_s, markdown, targets  # noqa: E402
from timing import (  # noqa: E402
    RateProbes, Runnable, measure, measure_rates)


# ---------------------------------------------------------------------------
# One configuration.
# ---------------------------------------------------------------------------


def useful_work(shape, active, mode):
    """(useful FLOPs, expert-weight bytes) of one call in `mode`."""
    t, d, h, k = shape["tokens"], shape["d"], shape["hidden"], shape["k"]
    flops = 4.0 * t * k * d * h
    weight_bytes = 4.0 * active * 2 * d * h
    if mode == "train_fwd_bwd":
        flops *= 2.5
        weight_bytes *= 2.5
    return flops, weight_bytes


def routing_facts(shape, sparse, capacity, data):
    """Active experts (experts receiving a token) and the capacity
    dispatch's capacity and dropped fraction, in training and inference."""
    import tensorflow as tf

    x = tf.constant(data["x"])
    t, e, k = shape["tokens"], shape["experts"], shape["k"]
    facts = {}
    for mode, training in (("train", True), ("infer", False)):
        _, routing = sparse(x, training=training, return_routing=True)
        part_sizes = routing["part_sizes"].numpy()
        facts["active_experts_" + mode] = int((part_sizes > 0).sum())
        facts["max_tokens_per_expert_" + mode] = int(part_sizes.max())
        _, routing = capacity(x, training=training, return_routing=True)
        facts["capacity_dropped_fraction_" + mode] = float(
            routing["dropped_fraction"])
        factor = CAPACITY_FACTOR if training else EVAL_CAPACITY_FACTOR
        facts["capacity_" + mode] = min(t, max(
            capacity.min_capacity, int(math.ceil(factor * t * k / e))))
    return facts


def run_config(name, shape, modes, plan, client, methods=METHODS,
               roofline=True):
    """Times every method in every mode of one configuration (with the
    machine's rates among them, round-robin, when `roofline`)."""
    import tensorflow as tf

    t_start = time.time()
    seed = config_seed(name)
    key = "%s/%d" % (name, shape["experts"])
    orig_pending = False
    if "original" in methods and client is not None:
        orig_pending = client.send(op="build", key=key, shape=shape,
                                   seed=seed) is None
    data = make_data(shape, seed)
    x = tf.constant(data["x"])
    oracle_x = tf.constant(data["oracle_x"])
    out = {"shape": shape, "modes": list(modes)}
    sparse = build_ours(shape, data, "sparse")
    capacity = build_ours(shape, data, "capacity")
    oracle_fns, oracle_vars = oracle_functions(shape, data)
    dense_bytes = 4 * shape["tokens"] * shape["experts"] * shape["hidden"]
    fns = {"sparse": ours_functions(sparse),
           "capacity": ours_functions(capacity),
           "capacity_xla": ours_functions(capacity, jit_compile=True)}
    dense_skip = None
    if "dense_all" in methods:
        if dense_bytes > DENSE_MAX_BYTES:
            dense_skip = ("skipped: [tokens, experts, hidden] is %.1f GiB"
                          % (dense_bytes / 2**30))
        else:
            fns["dense_all"] = dense_functions(sparse, shape)

    facts = routing_facts(shape, sparse, capacity, data)
    out["routing"] = facts
    # Sanity: every method computes the same function (inference).
    y_sparse = fns["sparse"]["infer_fwd"](x)[0].numpy()
    check = {"sum_abs_y_sparse": float(np.abs(y_sparse).sum())}
    y_cap = fns["capacity"]["infer_fwd"](x)[0].numpy()
    check["max_abs_diff_capacity_vs_sparse"] = float(
        np.abs(y_cap - y_sparse).max())
    if "dense_all" in fns:
        y_dense = fns["dense_all"]["infer_fwd"](x)[0].numpy()
        check["max_abs_diff_dense_all_vs_sparse"] = float(
            np.abs(y_dense - y_sparse).max())
    else:
        check["max_abs_diff_dense_all_vs_sparse"] = None
    check["max_abs_y_sparse"] = float(np.abs(y_sparse).max())
    del data

    orig_error = None
    if client is None:
        orig_error = "original not found: skipped"
    elif "original" in methods:
        res = client.receive() if orig_pending else client.request(
            op="build", key=key, shape=shape, seed=seed)
        if res.get("ok"):
            out["original_build_s"] = res["build_s"]
            res = client.request(op="check", key=key)
            check["sum_abs_y_original"] = res.get("sum_abs_y")
        else:
            orig_error = "original failed: %s" % res.get("error")
            log("  " + orig_error)
    check.setdefault("sum_abs_y_original", None)
    out["check"] = check

    runnables = []
    for method in methods:
        for mode in modes:
            if method in fns:
                arg = oracle_x if method == "oracle" else x
                r = Runnable(method, mode, fns[method][mode], (arg,))
            elif method == "oracle":
                if mode == "infer_fwd" and "train_fwd" in modes:
                    continue  # the same function as train_fwd
                r = Runnable(method, mode, oracle_fns[mode], (oracle_x,))
            elif method == "original":
                r = Runnable(method, mode, client=client, key=key)
                if orig_error is not None:
                    r.error = orig_error
            elif method == "dense_all":
                r = Runnable(method, mode)
                r.error = dense_skip
            runnables.append(r)
    probes = RateProbes(plan) if roofline else None
    if probes is not None:
        runnables += probes.runnables
    t_measure = time.time()
    measure(runnables, plan)
    times = {m: {} for m in methods}
    for r in runnables:
        if r.method in times:
            times[r.method][r.mode] = r.result()
    if "oracle" in methods and "infer_fwd" in modes and "train_fwd" in modes:
        times["oracle"]["infer_fwd"] = dict(times["oracle"]["train_fwd"])
    out["times"] = times
    if client is not None and "original" in methods:
        client.request(op="close", key=key)

    # Ratios.
    med = {m: {mode: times[m][mode]["median_s"] for mode in modes}
           for m in methods}

    def ratio(a, b):
        return a / b if (a is not None and b) else None

    out["R_oracle"] = {m: {mode: ratio(med[m][mode], med["oracle"][mode])
                           for mode in modes} for m in methods}
    out["vs_original"] = {m: {mode: ratio(med[m][mode], med["original"][mode])
                              for mode in modes} for m in methods}
    if probes is not None:
        out["rates"] = probes.result()
        out["useful_gflop"], out["weight_mb"] = {}, {}
        out["roofline_s"], out["roofline_bound"] = {}, {}
        for mode in modes:
            active = facts["active_experts_" + (
                "infer" if mode == "infer_fwd" else "train")]
            flops, wbytes = useful_work(shape, active, mode)
            t_flop = ratio(flops / 1e9, out["rates"]["gemm_gflops"])
            t_bytes = ratio(wbytes / 1e9, out["rates"]["read_gbps"])
            out["useful_gflop"][mode] = flops / 1e9
            out["weight_mb"][mode] = wbytes / 1e6
            if t_flop is None or t_bytes is None:
                out["roofline_s"][mode] = out["roofline_bound"][mode] = None
                continue
            out["roofline_s"][mode] = max(t_flop, t_bytes)
            out["roofline_bound"][mode] = ("compute" if t_flop >= t_bytes
                                           else "memory")
        out["R_roofline"] = {
            m: {mode: ratio(med[m][mode], out["roofline_s"][mode])
                for mode in modes} for m in methods}
    out["wall_s"] = time.time() - t_start
    out["setup_s"] = t_measure - t_start
    del fns, sparse, capacity, oracle_fns, oracle_vars, runnables, probes
    gc.collect()
    return out


def run_scaling(spec, plan, client):
    out = {"shape": {k: spec[k] for k in ("tokens", "d", "hidden", "k")},
           "experts": list(spec["experts"]), "mode": "train_fwd_bwd",
           "times": {m: {} for m in SCALING_METHODS + ("oracle",)}}
    for e in spec["experts"]:
        shape = shape_dict(spec["tokens"], spec["d"], spec["hidden"], e,
                           spec["k"])
        res = run_config_scaling(e, shape, plan, client)
        for m in res:
            out["times"][m][str(e)] = res[m]
        log("scaling: %d experts done (%s)" % (e, ", ".join(
            "%s %s" % (m, fmt_s(res[m]["median_s"])) for m in res)))
    hi, lo = spec["ratio"]
    out["cost_ratio_experts"] = [hi, lo]
    out["cost_ratio"] = {}
    for m in SCALING_METHODS + ("oracle",):
        t = out["times"][m]
        a = t.get(str(hi), {}).get("median_s")
        b = t.get(str(lo), {}).get("median_s")
        out["cost_ratio"][m] = a / b if (a and b) else None
    return out


def run_config_scaling(e, shape, plan, client):
    """One point of the scaling sweep: forward + backward only."""
    name = "scaling-%d" % e
    methods = SCALING_METHODS + ("oracle",)
    res = run_config(name, shape, ("train_fwd_bwd",), plan, client,
                     methods=methods, roofline=False)
    return {m: res["times"][m]["train_fwd_bwd"] for m in methods}


# ---------------------------------------------------------------------------
# Main.
# ---------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv, __doc__.split("\n\n")[0])
    original = args.original or find_original()
    if original is not None and not os.path.isfile(original):
        log("--original %s does not exist" % original)
        original = None
    load_before = load_average()
    log("load average before: %s" % load_before)
    if args.quick and "XLA_FLAGS" not in os.environ:
        # --quick checks that everything runs: compile XLA without LLVM
        # optimizations (several times faster to compile).
        os.environ["XLA_FLAGS"] = "--xla_backend_optimization_level=0"

    import tensorflow as tf
    import keras
    import keras_moe

    # Before TensorFlow's runtime starts (forked children inherit it).
    tf.config.threading.set_intra_op_parallelism_threads(THREADS)
    tf.config.threading.set_inter_op_parallelism_threads(THREADS)
    plan = QUICK_PLAN if args.quick else FULL_PLAN
    configs = QUICK_CONFIGS if args.quick else CONFIGS
    scaling = QUICK_SCALING if args.quick else SCALING
    if args.profile is not None:
        name, method, mode = args.profile
        res = profile(name, shape_dict(*configs[name][:5]), method, mode,
                      args.profile_calls, args.profile_top, original)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1)
        print(format_profile(res))
        return 0

    meta = {"quick": args.quick, "threads": THREADS,
            "tensorflow": tf.__version__, "keras": keras.__version__,
            "keras_moe": keras_moe.__version__, "git": git_revision(),
            "machine": machine_info(), "environment": environment_info(),
            "original": original, "load_before": load_before,
            "xla_flags": os.environ.get("XLA_FLAGS"),
            "argv": sys.argv[1:], "plan": plan,
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if original is None:
        log("the original expert_utils_2017.py was not found: its columns "
            "are skipped (pass --original PATH or set KERAS_MOE_ORIGINAL)")

    results = {"meta": meta, "configs": collections.OrderedDict()}
    # Forks first: the memory children and the original's worker start
    # from this process before it starts TensorFlow's runtime.
    memory_handle = None
    if "memory" in args.selected:
        mshape = shape_dict(*configs[MEMORY_CONFIG][:5])
        methods = memory_methods(original)
        if args.quick:
            # One process for all methods, alongside the timings (which
            # --quick does not mean to be accurate).
            memory_handle = fork_memory_child(methods, mshape, original)
        else:
            log("memory: %s, one process per method ..." % MEMORY_CONFIG)
            mem = {}
            for m in methods:
                mem.update(join_memory_child(
                    fork_memory_child([m], mshape, original)))
            results["memory"] = memory_results(mem, mshape, original)
            log_memory(results["memory"])
    client = OriginalClient(original) if original is not None else None
    try:
        log("rates ...")
        rates = {"start": measure_rates(plan)}
        log("rates: GEMM %.1f GFLOP/s, read %.1f GB/s" % (
            rates["start"]["gemm_gflops"], rates["start"]["read_gbps"]))
        for name, c in configs.items():
            if name not in args.selected:
                continue
            shape = shape_dict(*c[:5])
            res = run_config(name, shape, c[5], plan, client)
            results["configs"][name] = res
            mode = "infer_fwd" if name == "serving" else "train_fwd_bwd"
            log("%s done in %.0f s (setup %.0f s): %s %s" % (
                name, res["wall_s"], res["setup_s"], MODE_LABELS[mode], ", ".join(
                    "%s %s" % (m, fmt_s(res["times"][m][mode]["median_s"]))
                    for m in METHODS)))
        if "scaling" in args.selected:
            results["scaling"] = run_scaling(scaling, plan, client)
            log("scaling done: cost(%d)/cost(%d) " % tuple(
                results["scaling"]["cost_ratio_experts"]) + ", ".join(
                "%s %s" % (m, fmt_r(v))
                for m, v in results["scaling"]["cost_ratio"].items()))
        rates["end"] = measure_rates(plan)
        if memory_handle is not None:
            results["memory"] = memory_results(
                join_memory_child(memory_handle), mshape, original)
            log_memory(results["memory"])
        log("rates at the end: GEMM %.1f GFLOP/s, read %.1f GB/s" % (
            rates["end"]["gemm_gflops"], rates["end"]["read_gbps"]))
    finally:
        if client is not None:
            client.close()
    rates["gemm_n"], rates["read_mib"] = plan["gemm_n"], plan["read_mib"]
    results["rates"] = rates
    meta["load_after"] = load_average()
    meta["wall_s"] = time.time() - START
    results["targets"] = targets(results)
    text = json.dumps(results, indent=1, default=_json_default)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    md = markdown(results)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(md)
    print(md)
    log("load average after: %s; total %.0f s" % (meta["load_after"],
                                                   meta["wall_s"]))
    return 0


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    return str(o)


if __name__ == "__main__":
    sys.exit(main())
