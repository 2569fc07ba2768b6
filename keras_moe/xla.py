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


def surely_tracing_for_xla():
    """True only where TensorFlow says it is tracing a function for XLA:
    for refusing, with a clear error, what does not compile (False where
    that cannot be told, so nothing is refused by mistake).

    Example:

    >>> surely_tracing_for_xla()
    False
    """
    return control_flow_util is not None and maybe_tracing_for_xla()


def check_not_xla(what, instead):
    """Raises a `ValueError` saying that `what` does not compile with XLA
    (its shapes depend on the data) and what does (`instead`), when called
    while a function is traced for XLA; TensorFlow's own error would be a
    compile-time-constant error deep inside an op."""
    if surely_tracing_for_xla():
        raise ValueError(
            f"{what} does not compile with XLA (`jit_compile=True`): its "
            f"shapes depend on the data. {instead}"
        )
