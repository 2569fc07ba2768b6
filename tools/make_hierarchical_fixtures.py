#!/usr/bin/env python
"""Regenerates tests/fixtures/parity_hierarchical.npz from the original.

    python tools/make_hierarchical_fixtures.py --original PATH/expert_utils_2017.py \
        [--out tests/fixtures/parity_hierarchical.npz] [--cases NAME ...]

Runs every case of `oracle.HIER_CASES` (tests/oracle.py) through the
original's `DistributedMixtureOfExperts` -- hierarchical (a secondary
`LocalMixtureOfExperts` per group) or flat -- over one or several datashards
on /cpu:0 (TF1 graph mode via tf.compat.v1; the original is loaded from PATH
at run time and is not part of this project), in training and in inference,
and stores the inputs, weights, noise draws and the original's combined
gates, importance, load, outputs, aux loss, expert_to_gates,
expert_to_identifiers and the gradients of `sum(y**2) + aux_loss` w.r.t.
every weight. Noise: one draw `[T, n1]` for the primary gating (each
datashard's RandomStandardNormal op is fed its rows) and one `[T, n1, n2]`
for the secondary gatings (group i's op is fed rows_i of column i, rows_i
being the tokens the primary gating routed to group i, in increasing order).
"""

import argparse
import importlib.util
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_oracle_harness():
    path = os.path.join(REPO_ROOT, "tests", "oracle.py")
    spec = importlib.util.spec_from_file_location("_keras_moe_parity_oracle",
                                                  path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None):
    oracle = _load_oracle_harness()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--original", default=oracle.find_original(),
                        help="path of the original expert_utils_2017.py "
                        "(default: $KERAS_MOE_ORIGINAL or "
                        "../shared/reference/expert_utils_2017.py)")
    parser.add_argument("--out", default=oracle.HIER_DEFAULT_FIXTURES)
    parser.add_argument("--cases", nargs="*", default=None,
                        help="subset of case names (default: all); the "
                        "other cases already in --out are kept")
    args = parser.parse_args(argv)
    if not args.original or not os.path.isfile(args.original):
        parser.error("--original: no such file: %r" % (args.original,))

    module = oracle.load_original(args.original)
    names = args.cases or [c["name"] for c in oracle.HIER_CASES]
    unknown = [n for n in names if n not in oracle.HIER_CASES_BY_NAME]
    if unknown:
        parser.error("--cases: unknown case(s) %r; known: %r" %
                     (unknown, sorted(oracle.HIER_CASES_BY_NAME)))

    case_results = {}
    for name in names:
        case = oracle.HIER_CASES_BY_NAME[name]
        start = time.time()
        data = oracle.make_hier_case_data(case)
        results = oracle.run_hier_oracle(module, case, data)
        case_results[name] = (data, results)
        nan = {mode: sorted(k for k, v in res.items() if np.isnan(v).any())
               for mode, res in results.items()}
        print("%-34s %.2fs  NaN: %s" % (name, time.time() - start, nan))

    if args.cases and os.path.isfile(args.out):
        old = np.load(args.out)
        meta = oracle.read_meta(old)
        for name in meta["index"]:
            if name not in case_results and name in oracle.HIER_CASES_BY_NAME:
                _, data, results = oracle.unpack_hier(old, name, meta)
                case_results[name] = (data, results)
        order = [c["name"] for c in oracle.HIER_CASES]
        case_results = {n: case_results[n] for n in order if n in case_results}

    import tensorflow as tf

    flat = oracle.pack_cases(case_results, oracle.HIER_CASES_BY_NAME,
                             {"tensorflow": tf.__version__,
                              "original": os.path.basename(args.original)})
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.savez_compressed(args.out, **flat)
    print("wrote %s (%d arrays, %d bytes)" %
          (args.out, len(flat), os.path.getsize(args.out)))


if __name__ == "__main__":
    sys.exit(main())
