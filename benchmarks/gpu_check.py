#!/usr/bin/env python
"""GPU check (issue 14): time per training step and peak GPU memory of
MixtureOfExperts with the sparse dispatch, the capacity dispatch, XLA,
mixed precision and MirroredStrategy, in one markdown table.

Usage:
  python benchmarks/gpu_check.py                  # default size, one GPU
  python benchmarks/gpu_check.py --tiny           # under a minute, 2 CPUs
  python benchmarks/gpu_check.py --json out.json  # the results as JSON too
  python benchmarks/gpu_check.py --rows capacity_xla,mirrored
  python benchmarks/gpu_check.py --tokens 4096 --experts 32   # a smaller GPU
  python benchmarks/gpu_check.py --tiny --rows mirrored --cpu-replicas 2

The model is Input(d) -> MixtureOfExperts(experts, k, hidden_sizes=(hidden,))
-> Dense(d), trained with Adam on mean squared error against random targets;
one step is `model.train_on_batch` on `tokens` rows already on the device
(forward, backward, optimizer update, routing metrics). The default size
(tokens 8192, d 1024, hidden 4096, 64 experts, k 2: 537M expert weights,
about 10 GB with Adam's state) is for one GPU with 16 GB or more, sized for
the whole run to take under 5 minutes on a recent one (the XLA compiles
should dominate); `--tokens`, `--experts` etc. scale it down.
`--tiny` (alias `--quick`): tokens 64, d 16, hidden 32, 8 experts, XLA
compiled at -O0; it checks that every row runs, its numbers mean nothing.

Rows (`--rows` takes a comma-separated subset of the names):
  sparse             dispatch="sparse", float32 (it never compiles with XLA)
  capacity           dispatch="capacity", float32, no XLA
  capacity_xla       dispatch="capacity", float32, jit_compile=True
  capacity_xla_bf16  the same under the mixed_bfloat16 policy (skipped on
                     GPUs older than compute capability 8.0)
  capacity_xla_fp16  the same under the mixed_float16 policy
  mirrored           dispatch="capacity", float32, MirroredStrategy over all
                     visible GPUs (skipped with fewer than 2), no XLA (Keras
                     compiles the whole distributed step, which XLA rejects
                     under MirroredStrategy); each replica trains on its own
                     `tokens` rows, so the global batch is tokens x replicas.
                     With no GPU, `--cpu-replicas N` runs it over N logical
                     CPU devices instead.

Each row starts from a fresh Keras state (`keras.backend.clear_session()`,
the dtype policy restored afterwards). Its first step (trace, XLA compile
and one step) is reported on its own; then `--warmup` more steps are run
and left out, and the time per step is the median of `--steps` steps.
Peak GPU memory is `tf.config.experimental.get_memory_info(...)["peak"]`
after `reset_memory_stats` at the row's start (the largest over the row's
GPUs); n/a without a GPU. A row that fails is reported in the table and the
others still run; the exit status is 1 if any row that should run failed.
Progress goes to stderr, the table to stdout.
"""

import argparse
import json
import os
import statistics
import sys
import time

from machine import environment_info, git_revision, machine_info

START = time.time()

SIZES = {
    "default": {"tokens": 8192, "d": 1024, "hidden": 4096, "experts": 64,
                "k": 2, "warmup": 2, "steps": 10},
    "tiny": {"tokens": 64, "d": 16, "hidden": 32, "experts": 8, "k": 2,
             "warmup": 1, "steps": 3},
}

# name: (dispatch, dtype policy, jit_compile, MirroredStrategy)
ROWS = {
    "sparse": ("sparse", "float32", False, False),
    "capacity": ("capacity", "float32", False, False),
    "capacity_xla": ("capacity", "float32", True, False),
    "capacity_xla_bf16": ("capacity", "mixed_bfloat16", True, False),
    "capacity_xla_fp16": ("capacity", "mixed_float16", True, False),
    "mirrored": ("capacity", "float32", False, True),
}

GIB = 2.0 ** 30


def log(msg):
    print("[gpu_check %6.1fs] %s" % (time.time() - START, msg),
          file=sys.stderr, flush=True)


def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", "--quick", action="store_true",
                   help="tiny shapes: checks that every row runs")
    for key in SIZES["default"]:
        p.add_argument("--" + key, type=int, default=None,
                       help="default %d (--tiny: %d)"
                       % (SIZES["default"][key], SIZES["tiny"][key]))
    p.add_argument("--rows", default=",".join(ROWS),
                   help="comma-separated subset of: " + ", ".join(ROWS))
    p.add_argument("--cpu-replicas", type=int, default=0,
                   help="with no GPU visible, run the mirrored row over "
                   "this many logical CPU devices (default 0: skip it)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    size = dict(SIZES["tiny" if args.tiny else "default"])
    for key in size:
        if getattr(args, key) is not None:
            size[key] = getattr(args, key)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown or not rows:
        p.error("--rows: unknown %s; choose from %s"
                % (", ".join(unknown) or "(none given)", ", ".join(ROWS)))
    return args, size, rows


def describe_gpus(tf, gpus):
    """[(name 'GPU:i', model, compute capability or None)] for the GPUs."""
    out = []
    for i, gpu in enumerate(gpus):
        try:
            details = tf.config.experimental.get_device_details(gpu)
        except Exception:  # details are optional: report what is known
            details = {}
        out.append(("GPU:%d" % i, details.get("device_name", "unknown GPU"),
                    details.get("compute_capability")))
    return out


def skip_reason(name, gpus, cpu_replicas):
    """Why row `name` cannot run on this machine, or None."""
    policy, mirrored = ROWS[name][1], ROWS[name][3]
    if mirrored and len(gpus) < 2:
        if not gpus and cpu_replicas >= 2:
            return None
        return ("needs 2 or more GPUs (%d visible)" % len(gpus)
                + ("; --cpu-replicas 2 runs it over logical CPUs"
                   if not gpus else ""))
    if policy == "mixed_bfloat16" and gpus:
        old = [g for g in gpus if g[2] is not None and tuple(g[2]) < (8, 0)]
        if old:
            return ("bfloat16 needs compute capability 8.0 or newer "
                    "(%s has %d.%d)" % (old[0][0], old[0][2][0],
                                        old[0][2][1]))
    return None


def row_devices(name, gpus, cpu_replicas):
    """The devices row `name` runs on: a MirroredStrategy's list, or the
    single default device."""
    if not ROWS[name][3]:
        return [gpus[0][0] if gpus else "CPU:0"]
    if gpus:
        return [g[0] for g in gpus]
    return ["CPU:%d" % i for i in range(cpu_replicas)]


def run_row(name, size, devices, gpu_names):
    """Trains the row's model for 1 + warmup + steps steps; its timings and
    peak GPU memory."""
    import keras
    import tensorflow as tf
    import keras_moe

    dispatch, policy, xla, mirrored = ROWS[name]
    previous = keras.config.dtype_policy()
    keras.backend.clear_session()  # with gc.collect(): the last row's memory
    for dev in gpu_names:
        tf.config.experimental.reset_memory_stats(dev)
    current = [tf.config.experimental.get_memory_info(dev)["current"]
               for dev in gpu_names]
    keras.utils.set_random_seed(0)
    keras.config.set_dtype_policy(policy)
    model = x = y = None
    try:
        strategy = (tf.distribute.MirroredStrategy(["/" + d for d in devices])
                    if mirrored else tf.distribute.get_strategy())
        with strategy.scope():
            inputs = keras.Input((size["d"],))
            h = keras_moe.MixtureOfExperts(
                num_experts=size["experts"], k=size["k"],
                hidden_sizes=(size["hidden"],), dispatch=dispatch,
                name="moe")(inputs)
            model = keras.Model(inputs, keras.layers.Dense(size["d"])(h))
            model.compile(optimizer="adam", loss="mse", jit_compile=xla)
        if bool(model.jit_compile) != xla:
            raise RuntimeError("Keras set jit_compile=%r, asked for %r"
                               % (model.jit_compile, xla))
        with tf.device("/" + devices[0]):
            x = tf.random.normal((size["tokens"], size["d"]), seed=1)
            y = tf.random.normal((size["tokens"], size["d"]), seed=2)
        # train_on_batch returns Python floats: each call waits for its step.
        t = time.perf_counter()
        model.train_on_batch(x, y)
        first = time.perf_counter() - t
        for _ in range(size["warmup"]):
            model.train_on_batch(x, y)
        times = []
        for _ in range(size["steps"]):
            t = time.perf_counter()
            model.train_on_batch(x, y)
            times.append(time.perf_counter() - t)
        peak = [tf.config.experimental.get_memory_info(dev)["peak"]
                for dev in gpu_names]
    finally:
        keras.config.set_dtype_policy(previous)
        del model, x, y
        keras.backend.clear_session(free_memory=False)  # next row collects
    median = statistics.median(times)
    replicas = len(devices) if mirrored else 1
    return {"first_step_s": first, "median_step_s": median,
            "min_step_s": min(times), "step_times_s": times,
            "tokens_per_s": size["tokens"] * replicas / median,
            "peak_gpu_bytes": max(peak) if peak else None,
            "gpu_bytes_at_start": max(current) if current else None}


def short_error(e):
    msg = str(e).strip().splitlines()
    msg = msg[0] if msg else ""
    if len(msg) > 100:
        msg = msg[:97] + "..."
    return "%s: %s" % (type(e).__name__, msg)


def cell(text):
    return str(text).replace("|", "\\|")


def format_report(meta, results):
    """The header lines, the markdown table and its footnotes."""
    s = meta["size"]
    m = meta["machine"]
    lines = [
        "# keras_moe GPU check",
        "",
        "TensorFlow %s, Keras %s, keras_moe %s, commit %s" % (
            meta["tensorflow"], meta["keras"], meta["keras_moe"],
            meta["git"]),
        "CPU: %s (%s cores), Python %s, %s" % (
            m.get("cpu_model", "unknown"), m.get("nproc"), m.get("python"),
            m.get("platform")),
        "Devices: " + ("; ".join("%s %s (compute capability %s)" % (
            g[0], g[1], "%d.%d" % tuple(g[2]) if g[2] else "unknown")
            for g in meta["gpus"]) or "CPU only, no GPU visible"),
        "Size: tokens %d, d %d, hidden %d, experts %d, k %d; the first "
        "step, %d more to warm up, then the median of %d steps" % (
            s["tokens"], s["d"], s["hidden"], s["experts"], s["k"],
            s["warmup"], s["steps"]),
        "Environment: %s" % (", ".join(
            "%s=%s" % kv for kv in sorted(meta["environment"].items()))
            or "defaults") + (", XLA_FLAGS=%s" % meta["xla_flags"]
                              if meta["xla_flags"] else ""),
        "",
        "| row | dispatch | dtype policy | XLA | devices | first step (s) ¹ "
        "| step (ms) | tokens/s | peak GPU memory (GiB) ² | status |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ok = r["status"] == "ok"
        peak = r.get("peak_gpu_bytes")
        lines.append("| %s |" % " | ".join(cell(c) for c in (
            r["row"], r["dispatch"], r["policy"],
            "yes" if r["xla"] else "no", ", ".join(r["devices"]),
            "%.2f" % r["first_step_s"] if ok else "",
            "%.3g" % (1e3 * r["median_step_s"]) if ok else "",
            "%.0f" % r["tokens_per_s"] if ok else "",
            ("%.2f" % (peak / GIB) if peak is not None else "n/a")
            if ok else "",
            r["status"] if ok else "%s: %s" % (r["status"], r["reason"]))))
    lines += [
        "",
        "¹ Tracing, XLA compilation (rows with XLA) and one step; not part "
        "of the step time.",
        "² " + ("Peak bytes in use by TensorFlow's GPU allocator during the "
                "row (the largest over its GPUs), from "
                "`tf.config.experimental.get_memory_info`, reset at the "
                "row's start." if meta["gpus"] else
                "n/a: no GPU visible; TensorFlow tracks peak memory only in "
                "its GPU allocator (on CPU `get_memory_info` reports 0; "
                "`benchmarks/peak_memory.py` measures peak RSS instead)."),
        "",
        "Total %.1f s." % meta["wall_s"],
    ]
    return "\n".join(lines)


def main(argv=None):
    args, size, rows = parse_args(argv)
    if args.tiny and "XLA_FLAGS" not in os.environ:
        # --tiny checks that everything runs: compile XLA without LLVM
        # optimizations (several times faster to compile).
        os.environ["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
    import tensorflow as tf
    import keras
    import keras_moe

    gpus = describe_gpus(tf, tf.config.list_physical_devices("GPU"))
    if not gpus and args.cpu_replicas >= 2 and "mirrored" in rows:
        # Before TensorFlow's runtime starts.
        tf.config.set_logical_device_configuration(
            tf.config.list_physical_devices("CPU")[0],
            [tf.config.LogicalDeviceConfiguration()] * args.cpu_replicas)
    if not gpus and not args.tiny:
        log("no GPU visible: the default size is meant for a GPU "
            "(--tiny runs in seconds)")
    meta = {"tiny": args.tiny, "size": size, "tensorflow": tf.__version__,
            "keras": keras.__version__, "keras_moe": keras_moe.__version__,
            "git": git_revision(), "machine": machine_info(),
            "environment": environment_info(),
            "xla_flags": os.environ.get("XLA_FLAGS"), "gpus": gpus,
            "argv": sys.argv[1:] if argv is None else list(argv)}
    results = []
    for name in rows:
        dispatch, policy, xla, mirrored = ROWS[name]
        reason = skip_reason(name, gpus, args.cpu_replicas)
        devices = [] if reason else row_devices(name, gpus, args.cpu_replicas)
        res = {"row": name, "dispatch": dispatch, "policy": policy,
               "xla": xla, "devices": devices}
        if reason:
            res.update(status="skipped", reason=reason)
            log("%s: skipped (%s)" % (name, reason))
        else:
            log("%s: running on %s" % (name, ", ".join(devices)))
            try:
                res.update(run_row(name, size, devices,
                                   [g[0] for g in gpus][:len(devices)]))
                res["status"] = "ok"
                log("%s: %.3g ms/step, first step %.2f s" % (
                    name, 1e3 * res["median_step_s"], res["first_step_s"]))
            except Exception as e:  # reported in the table
                res.update(status="failed", reason=short_error(e))
                log("%s: failed: %s" % (name, res["reason"]))
        results.append(res)
    meta["wall_s"] = time.time() - START
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": results}, f, indent=1)
    print(format_report(meta, results), flush=True)
    return 1 if any(r["status"] == "failed" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
