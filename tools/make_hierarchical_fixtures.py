#!/usr/bin/env python
"""Regenerates tests/fixtures/parity_hierarchical.npz from the original.

    python tools/make_hierarchical_fixtures.py --original PATH/expert_utils_2017.py \
        [--out tests/fixtures/parity_hierarchical.npz] [--cases NAME ...]

Runs every case of reference_harness.hierarchical through the original's
`DistributedMixtureOfExperts` -- hierarchical (a secondary
`LocalMixtureOfExperts` per group) or flat -- over one or several datashards
on /cpu:0 (TF1 graph mode via tf.compat.v1; the original is loaded from PATH
at run time and is not part of this project), in training and in inference,
and stores the inputs, weights, noise draws and the original's combined
gates, importance, load, outputs, aux loss, expert_to_gates,
expert_to_identifiers and the gradients of `sum(y**2) + aux_loss` w.r.t.
every weight (format: reference_harness.fixtures). Noise: one draw
`[T, n1]` for the primary gating (each datashard's RandomStandardNormal op
is fed its rows) and one `[T, n1, n2]` for the secondary gatings (group i's
op is fed rows_i of column i, rows_i being the tokens the primary gating
routed to group i, in increasing order).
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import fixture_cli  # noqa: E402  (puts the repository root on sys.path)
from reference_harness import hierarchical  # noqa: E402


def main(argv=None):
    fixture_cli.make_case_fixtures(__doc__, argv, hierarchical)


if __name__ == "__main__":
    sys.exit(main())
