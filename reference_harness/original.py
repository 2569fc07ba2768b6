"""Finding and loading the original expert_utils_2017.py.

The original is NOT part of this project. It is loaded at run time from a
path (`KERAS_MOE_ORIGINAL`, or `<repo>/../shared/reference/
expert_utils_2017.py`), its module-global `tf` replaced with a shim
(everything in `tensorflow.compat.v1` plus `contrib.training.HParams`), and
run in a TF1 graph + session while eager execution stays on for Keras in
the same process. This is the one file of the harness loaded from a path;
everything else is imported normally.
"""

import importlib.util
import os
import types

from reference_harness import REPO_ROOT

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ENV_VAR = "KERAS_MOE_ORIGINAL"
DEFAULT_PATH = os.path.join(REPO_ROOT, os.pardir, "shared", "reference",
                            "expert_utils_2017.py")


class HParams(object):
    """Stand-in for `tf.contrib.training.HParams`: keyword arguments as
    attributes."""

    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)

    def __repr__(self):
        return "HParams(%r)" % (self.__dict__,)


class _TFShim(object):
    """`tensorflow.compat.v1` plus `contrib.training.HParams`."""

    def __init__(self):
        import tensorflow as tf

        self._v1 = tf.compat.v1
        self.contrib = types.SimpleNamespace(
            training=types.SimpleNamespace(HParams=HParams))

    def __getattr__(self, name):
        return getattr(self._v1, name)


def find_original():
    """Path of the original expert_utils_2017.py (`$KERAS_MOE_ORIGINAL`,
    else `<repo>/../shared/reference/expert_utils_2017.py`), or None."""
    candidates = []
    env = os.environ.get(ENV_VAR)
    if env:
        candidates.append(env)
    candidates.append(DEFAULT_PATH)
    for path in candidates:
        if os.path.isfile(path):
            return os.path.abspath(path)
    return None


_LOADED = {}


def load_original(path):
    """Imports the original module from `path`, its `tf` replaced by the
    shim (once per path)."""
    path = os.path.abspath(path)
    if path in _LOADED:
        return _LOADED[path]
    spec = importlib.util.spec_from_file_location(
        "_keras_moe_oracle_expert_utils_2017", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.tf = _TFShim()
    _LOADED[path] = module
    return module


def session_config():
    """Session config: two threads, no graph rewriting (Grappler) -- the
    graphs run once, so optimizing them only costs time."""
    import tensorflow as tf

    config = tf.compat.v1.ConfigProto(intra_op_parallelism_threads=2,
                                      inter_op_parallelism_threads=2)
    config.graph_options.rewrite_options.disable_meta_optimizer = True
    return config
