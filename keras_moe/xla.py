"""Whether TensorFlow is tracing a function for XLA, where assertion ops do
not run and every shape must be static."""

import tensorflow as tf

try:  # TensorFlow's own test for "being traced for XLA"; private.
    from tensorflow.python.ops import control_flow_util
except ImportError:  # pragma: no cover - a TensorFlow that moved it
    control_flow_util = None


def maybe_tracing_for_xla():
    """True inside a function traced for XLA (`jit_compile=True`), and
    wherever that cannot be told (TensorFlow's private test moved): callers
    then take the choice that is right under XLA too.

    Example:

    >>> maybe_tracing_for_xla()
    False
    >>> bool(tf.function(lambda: tf.constant(maybe_tracing_for_xla()),
    ...                  jit_compile=True)())
    True
    """
    if control_flow_util is None:
        return True
    return bool(
        control_flow_util.GraphOrParentsInXlaContext(
            tf.compat.v1.get_default_graph()
        )
    )
