"""Per-op profile (--profile): where the time of one of our methods, or
of the original, goes, by op type and by name scope, from the TensorFlow
profiler's trace (ours) or the Session's step stats (the original)."""

import collections
import os
import re
import time

from configs import MODE_LABELS, config_seed, make_data
from methods import build_ours, ours_functions
from original_runner import build_original_graph, load_original


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
