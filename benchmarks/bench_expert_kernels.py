"""How fast could the experts' matmuls be on this CPU? TensorFlow's
per-expert `MatMul` (what the sparse dispatch runs) against the same
products done by numpy's BLAS (OpenBLAS in numpy's wheels), one expert at
a time, in the same run.

The issue-5 targets that docs/performance.md reports as unmet with few
tokens per expert (serving <= 0.6x the original, R_roofline <= 1.5) are
bounded by how fast a matmul with a few rows reads an expert's kernel.
This measures that bound for two kernels on the benchmark's shapes, so a
custom op can be judged before it is written. Per configuration (tokens,
d, hidden, experts, k from bench_moe.py's configs.py; tokens routed to
uniformly random experts):

- `forward`: every active expert's two layers, `x_e @ W0_e` then
  `h_e @ W1_e` (the sparse dispatch's forward matmuls, no activation);
- `kernel_grad`: every expert's layer-0 kernel gradient `x_e^T @ dz_e`
  written into one new stacked `[experts, d, hidden]` array.

Printed: median ms per call, the expert-weight GB/s it implies, and
blas / tf (below 1: the BLAS is faster). Timings only; nothing asserted.

    python benchmarks/bench_expert_kernels.py            # ~1 minute
    python benchmarks/bench_expert_kernels.py --quick    # seconds
"""

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # as bench_moe.py
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import configs  # noqa: E402  (bench_moe.py's configurations)
import machine  # noqa: E402

CONFIG_NAMES = ("small-batch", "many-experts", "serving")
KERNELS = ("forward", "kernel_grad")


def routed_rows(tokens, experts, k, rng):
    """Rows per expert for `tokens * k` choices of uniformly random
    experts."""
    choices = rng.integers(0, experts, tokens * k)
    return np.bincount(choices, minlength=experts)


def make_kernels(tokens, d, hidden, experts, k, seed=0):
    """{(kernel, method): zero-argument callable} for one configuration, and
    the expert-weight bytes each kernel reads or writes."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    rows = routed_rows(tokens, experts, k, rng)
    w0 = rng.standard_normal((experts, d, hidden)).astype(np.float32)
    w1 = rng.standard_normal((experts, hidden, d)).astype(np.float32)
    xs = [rng.standard_normal((r, d)).astype(np.float32) for r in rows]
    dzs = [rng.standard_normal((r, hidden)).astype(np.float32) for r in rows]
    active = [i for i, r in enumerate(rows) if r]

    def blas_forward():
        return [(xs[i] @ w0[i]) @ w1[i] for i in active]

    def blas_kernel_grad():
        # A fresh buffer per call, as an op's output would be: the same
        # allocator costs as TensorFlow's (see docs/performance.md).
        grad = np.empty_like(w0)
        for i, (x, dz) in enumerate(zip(xs, dzs)):
            np.matmul(x.T, dz, out=grad[i])
        return grad

    w0_t, w1_t = tf.constant(w0), tf.constant(w1)
    xs_t = [tf.constant(x) for x in xs]
    dzs_t = [tf.constant(dz) for dz in dzs]

    @tf.function
    def tf_forward():
        w0s, w1s = tf.unstack(w0_t, num=experts), tf.unstack(w1_t, num=experts)
        return tf.concat(
            [tf.matmul(tf.matmul(xs_t[i], w0s[i]), w1s[i]) for i in active], 0
        )

    @tf.function
    def tf_kernel_grad():
        grad = tf.stack(
            [tf.matmul(x, dz, transpose_a=True) for x, dz in zip(xs_t, dzs_t)]
        )
        # One entry per expert back to Python, not a 268 MB copy.
        return grad[:, 0, 0]

    def run_tf(fn):
        return lambda: fn().numpy()

    kernels = {
        ("forward", "tf"): run_tf(tf_forward),
        ("forward", "blas"): blas_forward,
        ("kernel_grad", "tf"): run_tf(tf_kernel_grad),
        ("kernel_grad", "blas"): blas_kernel_grad,
    }
    weight_bytes = {
        "forward": len(active) * 2 * d * hidden * 4,
        "kernel_grad": experts * d * hidden * 4,
    }
    facts = {"active_experts": len(active), "max_rows": int(rows.max()),
             "mean_rows": float(rows.mean())}
    return kernels, weight_bytes, facts


def median_times(kernels, reps, warmup=2):
    """Median seconds per call of each callable, sampled round-robin."""
    for fn in kernels.values():
        for _ in range(warmup):
            fn()
    samples = {key: [] for key in kernels}
    for _ in range(reps):
        for key, fn in kernels.items():
            start = time.perf_counter()
            fn()
            samples[key].append(time.perf_counter() - start)
    return {key: statistics.median(s) for key, s in samples.items()}


def run(quick=False, reps=None):
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(configs.THREADS)
    tf.config.threading.set_inter_op_parallelism_threads(configs.THREADS)
    shapes = configs.QUICK_CONFIGS if quick else configs.CONFIGS
    reps = reps or (3 if quick else 9)
    results = {
        "meta": {
            "quick": quick, "reps": reps,
            "tensorflow": tf.__version__, "numpy": np.__version__,
            "environment": machine.environment_info(),
            "threads": configs.THREADS,
        },
        "configs": {},
    }
    for name in CONFIG_NAMES:
        tokens, d, hidden, experts, k, _ = shapes[name]
        kernels, weight_bytes, facts = make_kernels(
            tokens, d, hidden, experts, k
        )
        times = median_times(kernels, reps)
        entry = dict(shape=configs.shape_dict(tokens, d, hidden, experts, k),
                     **facts, kernels={})
        for kernel in KERNELS:
            t_tf, t_blas = times[(kernel, "tf")], times[(kernel, "blas")]
            entry["kernels"][kernel] = {
                "tf_s": t_tf, "blas_s": t_blas,
                "tf_gbps": weight_bytes[kernel] / t_tf / 1e9,
                "blas_gbps": weight_bytes[kernel] / t_blas / 1e9,
                "blas_over_tf": t_blas / t_tf,
            }
        results["configs"][name] = entry
        print("[bench_expert_kernels] %s done" % name, file=sys.stderr)
    return results


def markdown(results):
    lines = [
        "| configuration | kernel | tf | blas | tf GB/s | blas GB/s "
        "| blas / tf |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, entry in results["configs"].items():
        for kernel, r in entry["kernels"].items():
            lines.append(
                "| %s | %s | %.1f ms | %.1f ms | %.1f | %.1f | %.2f |" % (
                    name, kernel, 1000 * r["tf_s"], 1000 * r["blas_s"],
                    r["tf_gbps"], r["blas_gbps"], r["blas_over_tf"]))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="scaled-down shapes, 3 repetitions")
    parser.add_argument("--reps", type=int,
                        help="samples per kernel (default 9; --quick 3)")
    parser.add_argument("--json", help="write the JSON results here")
    args = parser.parse_args(argv)
    results = run(quick=args.quick, reps=args.reps)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print(markdown(results))


if __name__ == "__main__":
    main()
