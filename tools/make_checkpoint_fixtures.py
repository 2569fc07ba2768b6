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

import argparse
import importlib.util
import json
import os
import shutil
import sys

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
    parser.add_argument("--out", default=oracle.CHECKPOINT_DIR)
    args = parser.parse_args(argv)
    if not args.original or not os.path.isfile(args.original):
        parser.error("--original: no such file: %r" % (args.original,))
    module = oracle.load_original(args.original)

    import tensorflow as tf

    arrays = {}
    meta = {"tensorflow": tf.__version__,
            "original": os.path.basename(args.original),
            "step": oracle.CHECKPOINT_STEP, "cases": {}}
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
