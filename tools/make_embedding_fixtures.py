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

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

import fixture_cli


def _non_finite(results):
    return sorted(k for k, v in results["ref"].items()
                  if not np.isfinite(v).all())


def main(argv=None):
    oracle = fixture_cli.load_oracle()
    args, module = fixture_cli.parse_args(
        __doc__, oracle, oracle.EMBEDDING_FIXTURES, argv)
    case_results = fixture_cli.run_cases(
        oracle.EMBEDDING_SOFTMAX_CASES, oracle.make_embedding_case_data,
        oracle.run_embedding_softmax_oracle, module, _non_finite,
        "non-finite")
    fixture_cli.save_npz(args.out, oracle.pack_embedding_softmax(
        case_results, fixture_cli.original_meta(args)))

if __name__ == "__main__":
    sys.exit(main())
