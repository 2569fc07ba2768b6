#!/usr/bin/env python
"""Regenerates tests/fixtures/embedding_softmax.npz from the original
expert_utils.py.

    python tools/make_embedding_fixtures.py \
        --original PATH/expert_utils_2017.py \
        [--out tests/fixtures/embedding_softmax.npz] [--cases NAME ...]

Runs every embedding and sampled-softmax case of
reference_harness.embedding_softmax through the original's
ParallelEmbeddingLookup, SampledSoftmaxLoss and ParallelSampledSoftmaxLoss
(TF1 graph mode via tf.compat.v1; the original is loaded from PATH at run
time and is not part of this project), and stores the cases' data (tables,
ids, features, targets, fixed sampled classes, expected counts, weights)
with the original's lookups, losses and gradients (format:
reference_harness.fixtures). tests/test_parity.py compares keras_moe's
ShardedEmbedding and SampledSoftmaxLoss against the file.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import fixture_cli  # noqa: E402  (puts the repository root on sys.path)
from reference_harness import embedding_softmax  # noqa: E402


def main(argv=None):
    fixture_cli.make_case_fixtures(
        __doc__, argv, embedding_softmax,
        bad_values=fixture_cli.non_finite_by_group, label="non-finite")


if __name__ == "__main__":
    sys.exit(main())
