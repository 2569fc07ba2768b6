#!/usr/bin/env python
"""Regenerates tests/fixtures/tf1_checkpoints/ with the original.

    python tools/make_checkpoint_fixtures.py --original PATH/expert_utils_2017.py \
        [--out tests/fixtures/tf1_checkpoints]

Builds, with the original expert_utils.py under tf.compat.v1 (loaded from
PATH at run time; not part of this project), a flat `LocalMixtureOfExperts`
and a hierarchical `DistributedMixtureOfExperts`, both named "moe"
(configurations: `oracle.CHECKPOINT_CASES`), sets their variables to
deterministic values, and saves each with `tf.compat.v1.train.Saver` (with a
`global_step`) under `<out>/<kind>/model.ckpt-1000`. `<out>/outputs.npz`
holds, per kind, the input batch `<kind>/x` and the original's inference
outputs on it (`<kind>/y`, `<kind>/importance`, `<kind>/load`), and the
configurations as JSON in `__meta__`.
"""

import json
import os
import shutil
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

import fixture_cli
from fixture_cli import REPO_ROOT


def main(argv=None):
    oracle = fixture_cli.load_oracle()
    args, module = fixture_cli.parse_args(
        __doc__, oracle, oracle.CHECKPOINT_DIR, argv)

    import tensorflow as tf

    arrays = {}
    meta = dict(fixture_cli.original_meta(args),
                step=oracle.CHECKPOINT_STEP, cases={})
    for kind in oracle.COMMITTED_CHECKPOINT_KINDS:
        directory = os.path.join(args.out, kind)
        if os.path.isdir(directory):
            shutil.rmtree(directory)
        prefix, out = oracle.write_original_checkpoint(module, kind,
                                                       directory)
        meta["cases"][kind] = oracle.CHECKPOINT_CASES[kind]
        for key, value in out.items():
            arrays["%s/%s" % (kind, key)] = value
        names = sorted(tf.train.load_checkpoint(prefix)
                       .get_variable_to_shape_map())
        print("%-13s %s: %d variables (%s ...)" %
              (kind, os.path.relpath(prefix, REPO_ROOT), len(names),
               ", ".join(names[:4])))
    arrays["__meta__"] = np.array(json.dumps(meta))
    path = os.path.join(args.out, "outputs.npz")
    np.savez_compressed(path, **arrays)
    total = sum(os.path.getsize(os.path.join(d, f))
                for d, _, fs in os.walk(args.out) for f in fs)
    print("wrote %s; %s holds %d bytes" % (path, args.out, total))


if __name__ == "__main__":
    sys.exit(main())
