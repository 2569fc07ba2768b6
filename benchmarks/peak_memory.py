"""Peak memory of one forward + backward step at the memory configuration
(configs.MEMORY_CONFIG) of each of configs.MEMORY_METHODS, measured in
forked children (forked before the parent starts TensorFlow's runtime).

After building, a first step; then the peak-RSS mark is reset
(/proc/self/clear_refs) and `ru_maxrss` after a second step minus the RSS
before it is the step's peak memory. glibc's dynamic mmap threshold is
pinned (mallopt) so freed large tensors leave the RSS. Where the mark
cannot be reset, the first step's `ru_maxrss` delta is used."""

import ctypes
import gc
import json
import os
import resource
import sys

from configs import MEMORY_CONFIG, MEMORY_METHODS, config_seed, make_data
from methods import build_ours, oracle_functions, ours_functions
from original_runner import build_original_graph, load_original
from progress import log
from report import fmt_r


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


def log_memory(mem):
    log("memory done: " + ", ".join(
        "%s %s MB" % (m, fmt_r(r.get("peak_delta_mb"), 1))
        for m, r in mem["methods"].items()))
