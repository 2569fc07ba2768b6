#!/usr/bin/env python
"""Regenerates tests/fixtures/tf1_checkpoints/ with the original.

    python tools/make_checkpoint_fixtures.py --original PATH/expert_utils_2017.py \
        [--out tests/fixtures/tf1_checkpoints]

Builds, with the original expert_utils.py under tf.compat.v1 (loaded from
PATH at run time; not part of this project), a flat `LocalMixtureOfExperts`
and a hierarchical `DistributedMixtureOfExperts`, both named "moe"
(configurations: `reference_harness.checkpoints.CASES`), sets their
variables to deterministic values, and saves each with
`tf.compat.v1.train.Saver` (with a `global_step`) under
`<out>/<kind>/model.ckpt-1000`. `<out>/outputs.npz` (format:
reference_harness.fixtures) holds, per configuration, the input batch
`data/x` and the original's inference outputs on it (`ref/y`,
`ref/importance`, `ref/load`); its `__meta__` also records the step.
"""

import os
import shutil
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import fixture_cli  # noqa: E402  (puts the repository root on sys.path)
from fixture_cli import REPO_ROOT  # noqa: E402
from reference_harness import checkpoints, fixtures  # noqa: E402


def main(argv=None):
    args, module = fixture_cli.parse_args(__doc__, checkpoints.DIRECTORY,
                                          argv)

    import tensorflow as tf

    case_results, cases = {}, []
    for kind in checkpoints.COMMITTED_KINDS:
        directory = os.path.join(args.out, kind)
        if os.path.isdir(directory):
            shutil.rmtree(directory)
        prefix, out = checkpoints.write_original_checkpoint(module, kind,
                                                            directory)
        case = checkpoints.CASES[kind]
        cases.append(case)
        case_results[case["name"]] = checkpoints.outputs_entry(out)
        names = sorted(tf.train.load_checkpoint(prefix)
                       .get_variable_to_shape_map())
        print("%-13s %s: %d variables (%s ...)" %
              (kind, os.path.relpath(prefix, REPO_ROOT), len(names),
               ", ".join(names[:4])))
    meta = dict(fixture_cli.original_meta(args), step=checkpoints.STEP)
    fixture_cli.save_npz(os.path.join(args.out, "outputs.npz"),
                         fixtures.pack(cases, case_results, meta))
    total = sum(os.path.getsize(os.path.join(d, f))
                for d, _, fs in os.walk(args.out) for f in fs)
    print("%s holds %d bytes" % (args.out, total))


if __name__ == "__main__":
    sys.exit(main())
