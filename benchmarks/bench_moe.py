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
"""

import collections
import ctypes
import gc
import json
import math
import os
import re
import resource
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["KERAS_BACKEND"] = "tensorflow"

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import numpy as np  # noqa: E402

from configs import (  # noqa: E402
    CAPACITY_FACTOR, CONFIGS, DENSE_MAX_BYTES, EVAL_CAPACITY_FACTOR,
    FULL_PLAN, MEMORY_CONFIG, MEMORY_METHODS, METHODS, MODE_LABELS,
    QUICK_CONFIGS, QUICK_PLAN, QUICK_SCALING, SCALING, SCALING_METHODS,
    THREADS, config_seed, make_data, parse_args, shape_dict)
from machine import (  # noqa: E402
    environment_info, git_revision, load_average, machine_info)
from methods import (  # noqa: E402
    build_ours, dense_functions, oracle_functions, ours_functions)
from original_runner import (  # noqa: E402
    OriginalClient, build_original_graph, find_original, load_original)
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
# Memory (forked children, before this process starts TensorFlow's runtime).
# ---------------------------------------------------------------------------


def _rss_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None


def _reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _maxrss_kib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _memory_step(method, shape, original_path):
    """Builds `method` at `shape`; returns its forward + backward step."""
    data = make_data(shape, config_seed(MEMORY_CONFIG))
    if method == "original":
        module = load_original(original_path)
        sess, train, fetches, _ = build_original_graph(module, shape, data)

        def step():
            sess.run(fetches["train_fwd_bwd"], {train: True})

        return step, sess.close
    import tensorflow as tf

    if method == "oracle":
        fns, _ = oracle_functions(shape, data)
        arg = tf.constant(data["oracle_x"])
    else:
        layer = build_ours(shape, data,
                           "sparse" if method == "sparse" else "capacity")
        fns = ours_functions(layer, jit_compile=method == "capacity_xla")
        arg = tf.constant(data["x"])
    fn = fns["train_fwd_bwd"]
    fn.get_concrete_function(arg)  # traced (and compiled) before the steps

    def step():
        fn(arg)

    return step, None


def memory_child(methods, shape, original_path):
    """Peak memory of one forward + backward step of each method, in turn
    (MB): the peak-RSS mark is reset before a step and `ru_maxrss` after it
    minus the RSS before it is the step's peak; the first step (which also
    allocates one-time state) and a second one are measured."""
    try:  # pin glibc's mmap threshold: freed big tensors leave the RSS
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass
    results = {}
    for method in methods:
        try:
            step, close = _memory_step(method, shape, original_path)
            gc.collect()
            reset = _reset_peak()
            rss0, max0 = _rss_kib(), _maxrss_kib()
            step()
            cold = _maxrss_kib() - (rss0 if reset else max0)
            gc.collect()
            if reset:
                _reset_peak()
                rss1 = _rss_kib()
                step()
                peak = _maxrss_kib() - rss1
                how = ("second step: ru_maxrss after - RSS before, peak mark "
                       "reset (/proc/self/clear_refs)")
            else:
                peak = cold
                how = "first step: ru_maxrss delta (peak mark not resettable)"
            results[method] = {
                "peak_delta_mb": peak / 1024.0,
                "first_step_delta_mb": cold / 1024.0,
                "rss_before_mb": rss0 / 1024.0, "how": how}
            if close is not None:
                close()
            del step
            gc.collect()
        except Exception as e:
            results[method] = {"peak_delta_mb": None,
                               "error": "%s: %s" % (type(e).__name__, e)}
    return results


def fork_memory_child(methods, shape, original_path):
    """Forks a process running memory_child; returns (pid, read end)."""
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            res = memory_child(methods, shape, original_path)
        except BaseException as e:
            res = {m: {"peak_delta_mb": None,
                       "error": "%s: %s" % (type(e).__name__, e)}
                   for m in methods}
        with os.fdopen(w, "w") as f:
            f.write(json.dumps(res))
        sys.stderr.flush()
        os._exit(0)
    os.close(w)
    return pid, r, methods


def join_memory_child(handle):
    pid, r, methods = handle
    with os.fdopen(r) as f:
        text = f.read()
    _, status = os.waitpid(pid, 0)
    try:
        return json.loads(text)
    except ValueError:
        return {m: {"peak_delta_mb": None,
                    "error": "child exited with status %d" % status}
                for m in methods}


def memory_methods(original_path):
    return [m for m in MEMORY_METHODS
            if m != "original" or original_path is not None]


def memory_results(results, shape, original_path):
    if original_path is None:
        results["original"] = {"peak_delta_mb": None,
                               "error": "original not found: skipped"}
    oracle_mb = results.get("oracle", {}).get("peak_delta_mb")
    ratios = {m: (results[m]["peak_delta_mb"] / oracle_mb
                  if results[m].get("peak_delta_mb") is not None
                  and oracle_mb else None)
              for m in MEMORY_METHODS}
    return {"config": MEMORY_CONFIG, "shape": shape,
            "methods": {m: results[m] for m in MEMORY_METHODS},
            "ratio_vs_oracle": ratios}


# ---------------------------------------------------------------------------
# Per-op profile (--profile).
# ---------------------------------------------------------------------------


def _profile_ours(name, shape, method, mode, calls):
    """(wall s/call unprofiled, profiled, [(op name, op type, seconds)])
    of one of our methods, from the TensorFlow profiler's trace: the op
    kernels on the executor's threads."""
    import glob
    import shutil
    import tempfile

    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    data = make_data(shape, config_seed(name))
    layer = build_ours(shape, data,
                       "sparse" if method == "sparse" else "capacity")
    fn = ours_functions(layer, jit_compile=method == "capacity_xla")[mode]
    x = tf.constant(data["x"])
    del data
    for _ in range(3):
        fn(x)
    t = time.perf_counter()
    for _ in range(calls):
        fn(x)
    unprofiled = (time.perf_counter() - t) / calls
    logdir = tempfile.mkdtemp(prefix="bench_moe_profile_")
    try:
        tf.profiler.experimental.start(logdir)
        t = time.perf_counter()
        for _ in range(calls):
            fn(x)
        profiled = (time.perf_counter() - t) / calls
        tf.profiler.experimental.stop()
        path = sorted(glob.glob(os.path.join(
            logdir, "plugins", "profile", "*", "*.xplane.pb")))[-1]
        space = xplane_pb2.XSpace()
        with open(path, "rb") as f:
            space.ParseFromString(f.read())
    finally:
        shutil.rmtree(logdir, ignore_errors=True)
    events = []
    for plane in space.planes:
        if plane.name != "/host:CPU":
            continue
        meta = plane.event_metadata
        for line in plane.lines:
            if line.name == "python":
                continue
            for ev in line.events:
                op = meta[ev.metadata_id].name
                if ":" not in op or "::" in op:
                    continue  # executor bookkeeping, not an op kernel
                op_name, op_type = op.rsplit(":", 1)
                if op_name.startswith("gradient_tape/"):
                    op_name = "gradients/" + op_name[len("gradient_tape/"):]
                events.append((op_name, op_type, ev.duration_ps * 1e-12))
    return unprofiled, profiled, events


def _profile_original(name, shape, mode, calls, original_path):
    """The same for the original, from its Session's step stats
    (RunOptions.FULL_TRACE)."""
    import tensorflow as tf

    v1 = tf.compat.v1
    module = load_original(original_path)
    data = make_data(shape, config_seed(name))
    sess, train, fetches, _ = build_original_graph(module, shape, data)
    del data
    feed = {train: mode != "infer_fwd"}
    fetch = fetches[mode]
    for _ in range(3):
        sess.run(fetch, feed)
    t = time.perf_counter()
    for _ in range(calls):
        sess.run(fetch, feed)
    unprofiled = (time.perf_counter() - t) / calls
    types = {op.name: op.type for op in sess.graph.get_operations()}
    options = v1.RunOptions(trace_level=v1.RunOptions.FULL_TRACE)
    events = []
    t = time.perf_counter()
    for _ in range(calls):
        metadata = v1.RunMetadata()
        sess.run(fetch, feed, options=options, run_metadata=metadata)
        for dev in metadata.step_stats.dev_stats:
            for node in dev.node_stats:
                op_name = node.node_name.split(":")[0]
                if op_name not in types:
                    continue  # _SOURCE and the like
                events.append((op_name, types[op_name],
                               node.all_end_rel_micros * 1e-6))
    profiled = (time.perf_counter() - t) / calls
    sess.close()
    return unprofiled, profiled, events


def profile(name, shape, method, mode, calls, top, original_path=None):
    """Per-op profile of `calls` calls of `method` (ours, or "original"):
    op time by op type and by name scope (the first levels of the op's
    name; "bwd" for gradient ops). Returns a dict; `format_profile` prints
    it."""
    if method == "original":
        if original_path is None:
            raise SystemExit("--profile ...:original: the original was not "
                             "found (pass --original PATH)")
        unprofiled, profiled, events = _profile_original(
            name, shape, mode, calls, original_path)
    else:
        unprofiled, profiled, events = _profile_ours(name, shape, method,
                                                     mode, calls)
    by_type = collections.defaultdict(lambda: [0.0, 0])
    by_scope = collections.defaultdict(lambda: [0.0, 0])
    total = 0.0
    for op_name, op_type, seconds in events:
        parts = op_name.split("/")
        direction = "fwd"
        if parts[0] == "gradients":
            direction, parts = "bwd", parts[1:]
        depth = 3 if len(parts) > 3 else len(parts) - 1
        scope = "/".join(re.sub(r"_\d+", "", q) for q in parts[:depth])
        key = direction + " " + (scope or "(top)")
        by_type[op_type][0] += seconds
        by_type[op_type][1] += 1
        by_scope[key][0] += seconds
        by_scope[key][1] += 1
        total += seconds

    def table(d):
        rows = sorted(d.items(), key=lambda kv: -kv[1][0])[:top]
        return [{"name": k, "ms_per_call": v[0] / calls * 1e3,
                 "ops_per_call": v[1] / calls,
                 "share": v[0] / total if total else None} for k, v in rows]

    return {"config": name, "shape": shape, "method": method, "mode": mode,
            "calls": calls, "wall_ms_per_call": unprofiled * 1e3,
            "profiled_wall_ms_per_call": profiled * 1e3,
            "op_ms_per_call": total / calls * 1e3,
            "ops_per_call": len(events) / calls,
            "by_type": table(by_type), "by_scope": table(by_scope)}


def format_profile(p):
    s = p["shape"]
    lines = ["## Profile: %s %s, %s (tokens %d, d %d, hidden %d, experts %d, "
             "k %d)" % (p["method"], MODE_LABELS[p["mode"]], p["config"],
                        s["tokens"], s["d"], s["hidden"], s["experts"],
                        s["k"]), "",
             "Wall %.2f ms per call (%.2f ms while profiled); op kernels "
             "%.2f ms per call summed over threads, %.0f ops per call." % (
                 p["wall_ms_per_call"], p["profiled_wall_ms_per_call"],
                 p["op_ms_per_call"], p["ops_per_call"])]
    for key, title in (("by_type", "op type"), ("by_scope", "scope")):
        lines += ["", "| %s | ms/call | ops/call | share |" % title,
                  "|---|---|---|---|"]
        for r in p[key]:
            lines.append("| %s | %.3f | %.0f | %.1f%% |" % (
                r["name"], r["ms_per_call"], r["ops_per_call"],
                100 * (r["share"] or 0)))
    return "\n".join(lines) + "\n"


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


def log_memory(mem):
    log("memory done: " + ", ".join(
        "%s %s MB" % (m, fmt_r(r.get("peak_delta_mb"), 1))
        for m, r in mem["methods"].items()))


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    return str(o)


if __name__ == "__main__":
    sys.exit(main())
