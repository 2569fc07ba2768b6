#!/usr/bin/env python
"""Regenerates tests/fixtures/parity.npz from the original expert_utils.py.

    python tools/make_parity_fixtures.py --original PATH/expert_utils_2017.py \
        [--out tests/fixtures/parity.npz] [--cases NAME ...]

Runs every case of reference_harness.flat through the original (TF1 graph
mode via tf.compat.v1; the original is loaded from PATH at run time and is
not part of this project) in training and in inference, and stores the
inputs, weights, noise and the original's gates, load, importance, outputs,
aux loss and gradients (format: reference_harness.fixtures).
tests/test_parity.py compares keras_moe against the file.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import fixture_cli  # noqa: E402  (puts the repository root on sys.path)
from reference_harness import flat  # noqa: E402


def main(argv=None):
    fixture_cli.make_case_fixtures(__doc__, argv, flat)


if __name__ == "__main__":
    sys.exit(main())
