"""What bench_moe.py measures and how: the methods and modes, the
configurations (full and --quick shapes), the scaling sweep, the memory
configuration, the timing plans, each configuration's seeded inputs and
weights, and the command line."""

import argparse
import collections
import math
import zlib

import numpy as np

THREADS = 2
LOSS_COEF = 1e-2
CAPACITY_FACTOR = 1.25
EVAL_CAPACITY_FACTOR = 2.0

METHODS = ("sparse", "capacity", "capacity_xla", "original", "dense_all",
           "oracle")
OURS = ("sparse", "capacity", "capacity_xla")
MODES = ("train_fwd", "train_fwd_bwd", "infer_fwd")
MODE_LABELS = {"train_fwd": "train fwd", "train_fwd_bwd": "train fwd+bwd",
               "infer_fwd": "infer fwd"}

# name: (tokens, d, hidden, experts, k, modes)
CONFIGS = collections.OrderedDict([
    ("large", (8192, 512, 2048, 16, 2, MODES)),
    ("small-batch", (256, 512, 2048, 64, 2, MODES)),
    ("many-experts", (2048, 256, 1024, 256, 2, MODES)),
    ("serving", (32, 512, 2048, 64, 2, ("infer_fwd",))),
])
# --quick: d / 4, hidden / 4, tokens / 8 to / 32, experts / 2 to / 8 (the
# XLA compile time grows with tokens and the trace time with experts).
QUICK_CONFIGS = collections.OrderedDict([
    ("large", (256, 128, 512, 16, 2, MODES)),
    ("small-batch", (32, 128, 512, 32, 2, MODES)),
    ("many-experts", (128, 64, 256, 32, 2, MODES)),
    ("serving", (4, 128, 512, 32, 2, ("infer_fwd",))),
])
# cost_ratio = cost(ratio[0] experts) / cost(ratio[1] experts).
SCALING = dict(tokens=2048, d=256, hidden=1024, k=2,
               experts=(4, 16, 64, 256), ratio=(256, 16))
QUICK_SCALING = dict(tokens=128, d=64, hidden=256, k=2,
                     experts=(2, 4, 8, 16), ratio=(16, 4))
SCALING_METHODS = ("sparse", "capacity", "capacity_xla", "original")
MEMORY_CONFIG = "large"
MEMORY_METHODS = ("sparse", "capacity", "capacity_xla", "oracle", "original")

# Timing plans: warm-up calls, the shortest sample (calls are batched to
# reach it), the time budget of one method's samples, repetitions.
FULL_PLAN = dict(warmup=2, min_sample_s=0.05, budget_s=8.0, min_reps=3,
                 max_reps=15, slow_s=15.0, slow_reps=2,
                 gemm_n=2048, read_mib=256, rate_reps=7)
QUICK_PLAN = dict(warmup=2, min_sample_s=0.01, budget_s=0.25, min_reps=2,
                  max_reps=4, slow_s=5.0, slow_reps=2,
                  gemm_n=768, read_mib=64, rate_reps=3)
# The dense peer keeps [tokens, experts, hidden] float32 intermediates;
# skipped above this size.
DENSE_MAX_BYTES = 3 << 30


def shape_dict(tokens, d, hidden, experts, k):
    return dict(tokens=tokens, d=d, hidden=hidden, experts=experts, k=k)


def config_seed(name):
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def make_data(shape, seed):
    """Inputs and weights of a configuration (float32 numpy), the same in
    every process: x [T, d], gate and noise kernels [d, E] (N(0, 1/d):
    logits of unit scale, balanced random routing), expert kernels
    [E, d, h] and [E, h, d] (Glorot uniform) and the oracle's input
    [T * k, d]."""
    rng = np.random.default_rng(seed)
    t, d, h, e, k = (shape[key] for key in ("tokens", "d", "hidden",
                                            "experts", "k"))
    f32 = np.float32

    def uniform(size, limit):
        a = rng.random(size, dtype=f32)
        a *= 2 * limit
        a -= limit
        return a

    limit = math.sqrt(6.0 / (d + h))
    data = {
        "x": rng.standard_normal((t, d), dtype=f32),
        "gate_kernel": rng.standard_normal((d, e), dtype=f32) / f32(
            math.sqrt(d)),
        "noise_kernel": rng.standard_normal((d, e), dtype=f32) / f32(
            math.sqrt(d)),
        "kernel_0": uniform((e, d, h), limit),
        "kernel_1": uniform((e, h, d), limit),
        "oracle_x": rng.standard_normal((t * k, d), dtype=f32),
    }
    return data


def parse_args(argv=None, description=None):
    """bench_moe.py's command line; `description` heads its --help."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="scaled-down shapes, few repetitions (1-3 minutes)")
    p.add_argument("--original", default=None,
                   help="path of the original expert_utils_2017.py "
                        "(default: $KERAS_MOE_ORIGINAL or "
                        "../shared/reference/expert_utils_2017.py)")
    p.add_argument("--json", default=None,
                   help="write the JSON results here (default: stdout)")
    p.add_argument("--markdown", default=None,
                   help="also write the markdown table here")
    p.add_argument("--configs", default=None,
                   help="comma-separated subset of: %s, scaling, memory "
                        "(default: all)" % ", ".join(CONFIGS))
    p.add_argument("--profile", default=None, metavar="CONFIG[:METHOD[:MODE]]",
                   help="instead of the benchmark, print a per-op profile of "
                        "one of our methods or the original (default sparse, "
                        "train_fwd_bwd) at a configuration (with --quick: "
                        "its quick shape)")
    p.add_argument("--profile-calls", type=int, default=10)
    p.add_argument("--profile-top", type=int, default=25)
    args = p.parse_args(argv)
    if args.profile is not None:
        parts = args.profile.split(":")
        parts += ["sparse", "train_fwd_bwd"][len(parts) - 1:]
        if (len(parts) != 3 or parts[0] not in CONFIGS
                or parts[1] not in OURS + ("original",)
                or parts[2] not in MODES):
            p.error("--profile takes CONFIG[:METHOD[:MODE]] with CONFIG in "
                    "%s, METHOD in %s, original, MODE in %s" % (
                        ", ".join(CONFIGS), ", ".join(OURS), ", ".join(MODES)))
        args.profile = parts
    known = list(CONFIGS) + ["scaling", "memory"]
    if args.configs is None:
        args.selected = known
    else:
        args.selected = [c.strip() for c in args.configs.split(",")
                         if c.strip()]
        bad = [c for c in args.selected if c not in known]
        if bad:
            p.error("unknown --configs %s; choose from %s" % (
                ", ".join(bad), ", ".join(known)))
    return args
