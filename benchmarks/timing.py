"""Timing: a Runnable is one (method, mode) to time, in this process or
in the original's worker; `measure` warms each up, batches calls into
samples of at least the plan's shortest sample, and takes the samples
round-robin, so a change of the machine's load hits every method alike;
RateProbes times the machine's GEMM rate and read bandwidth the same way."""

import math
import statistics
import time

from progress import log


class Runnable(object):
    """One (method, mode) to time: `call(n)` runs it n times and returns the
    seconds per call."""

    def __init__(self, method, mode, fn=None, args=(), client=None, key=None):
        self.method, self.mode = method, mode
        self.fn, self.args = fn, args
        self.client, self.key = client, key
        self.samples = []
        self.first_call_s = None
        self.inner = 1
        self.reps = 0
        self.error = None

    def call(self, n):
        if self.client is not None:
            res = self.client.request(op="time", key=self.key,
                                      mode=self.mode, n=n)
            if not res.get("ok"):
                raise RuntimeError(res.get("error"))
            return res["t"]
        t = time.perf_counter()
        for _ in range(n):
            self.fn(*self.args)
        return (time.perf_counter() - t) / n

    def result(self):
        if self.error is not None or not self.samples:
            return {"median_s": None, "min_s": None, "n": 0,
                    "inner": self.inner, "first_call_s": self.first_call_s,
                    "error": self.error or "not measured"}
        return {"median_s": statistics.median(self.samples),
                "min_s": min(self.samples), "n": len(self.samples),
                "inner": self.inner, "first_call_s": self.first_call_s}


def measure(runnables, plan):
    """Warms every runnable up, then takes its samples round-robin."""
    for r in runnables:
        try:
            r.first_call_s = r.call(1)
            t = r.first_call_s
            if t < plan["slow_s"]:
                for _ in range(plan["warmup"] - 1):
                    t = r.call(1)
            r.inner = max(1, int(math.ceil(plan["min_sample_s"] / max(t,
                                                                      1e-9))))
            if t >= plan["slow_s"]:
                r.reps = plan["slow_reps"]
            else:
                r.reps = int(min(plan["max_reps"], max(
                    plan["min_reps"],
                    math.ceil(plan["budget_s"] / (t * r.inner)))))
        except Exception as e:  # reported in the results
            r.error = "%s: %s" % (type(e).__name__, e)
            log("  %s %s failed: %s" % (r.method, r.mode, r.error))
    live = [r for r in runnables if r.error is None]
    rounds = max([r.reps for r in live] or [0])
    for i in range(rounds):
        order = live[i % len(live):] + live[:i % len(live)]
        for r in order:
            if r.error is not None or len(r.samples) >= r.reps:
                continue
            try:
                r.samples.append(r.call(r.inner))
            except Exception as e:
                r.error = "%s: %s" % (type(e).__name__, e)
                log("  %s %s failed: %s" % (r.method, r.mode, r.error))


class RateProbes(object):
    """The machine's rates: a square float32 matmul (GEMM GFLOP/s) and a
    reduce_sum over a large array (read GB/s), as two Runnables."""

    def __init__(self, plan):
        import tensorflow as tf

        self.n = n = plan["gemm_n"]
        self.read_bytes = plan["read_mib"] * 2**20
        a = tf.random.normal([n, n])
        b = tf.random.normal([n, n])
        big = tf.random.uniform([self.read_bytes // 4])
        matmul = tf.function(lambda a, b: tf.matmul(a, b))
        reduce = tf.function(lambda v: tf.reduce_sum(v))
        self.gemm = Runnable("gemm", None, lambda: matmul(a, b).numpy())
        self.read = Runnable("read", None, lambda: reduce(big).numpy())
        self.runnables = [self.gemm, self.read]

    def result(self):
        g, r = self.gemm.result(), self.read.result()
        flop, nbytes = 2.0 * self.n**3, float(self.read_bytes)

        def rate(amount, t):
            return amount / t / 1e9 if t else None

        return {"gemm_gflops": rate(flop, g["median_s"]),
                "gemm_gflops_best": rate(flop, g["min_s"]),
                "read_gbps": rate(nbytes, r["median_s"]),
                "read_gbps_best": rate(nbytes, r["min_s"]),
                "samples": [g["n"], r["n"]]}


def measure_rates(plan):
    """The rates alone (at the start and the end of the run)."""
    probes = RateProbes(plan)
    measure(probes.runnables, dict(plan, min_reps=plan["rate_reps"],
                                   max_reps=plan["rate_reps"]))
    return probes.result()
