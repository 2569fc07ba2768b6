#!/usr/bin/env python
"""Regenerates tests/fixtures/embedding_softmax.npz from the original
expert_utils.py.

    python tools/make_embedding_fixtures.py \
        --original PATH/expert_utils_2017.py \
        [--out tests/fixtures/embedding_softmax.npz]

Runs every embedding and sampled-softmax case of tests/oracle.py
(EMBEDDING_SOFTMAX_CASES) through the original's ParallelEmbeddingLookup,
SampledSoftmaxLoss and ParallelSampledSoftmaxLoss (TF1 graph mode via
tf.compat.v1; the original is loaded from PATH at run time and is not part of
this project), and stores the cases' data (tables, ids, features, targets,
fixed sampled classes, expected counts, weights) with the original's
lookups, losses and gradients. tests/test_embedding.py and
tests/test_sampled_softmax.py compare keras_moe against the file.
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
    parser.add_argument("--out", default=oracle.EMBEDDING_FIXTURES)
    args = parser.parse_args(argv)
    if not args.original or not os.path.isfile(args.original):
        parser.error("--original: no such file: %r" % (args.original,))

    module = oracle.load_original(args.original)
    case_results = {}
    for case in oracle.EMBEDDING_SOFTMAX_CASES:
        start = time.time()
        data = oracle.make_embedding_case_data(case)
        results = oracle.run_embedding_softmax_oracle(module, case, data)
        bad = sorted(k for k, v in results["ref"].items()
                     if not np.isfinite(v).all())
        case_results[case["name"]] = (data, results)
        print("%-28s %.2fs  non-finite: %s" % (case["name"],
                                               time.time() - start, bad))

    import tensorflow as tf

    flat = oracle.pack_embedding_softmax(
        case_results, {"tensorflow": tf.__version__,
                       "original": os.path.basename(args.original)})
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.savez_compressed(args.out, **flat)
    print("wrote %s (%d arrays, %d bytes)" %
          (args.out, len(flat), os.path.getsize(args.out)))


if __name__ == "__main__":
    sys.exit(main())
