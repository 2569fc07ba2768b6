"""Whether TensorFlow is tracing a function for XLA, where assertion ops do
not run and every shape must be static."""

import tensorflow as tf  # noqa: F401 (the doctests use it)

from keras_moe import private_hooks


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
    return private_hooks.xla_tracing() is not False


def surely_tracing_for_xla():
    """True only where TensorFlow says it is tracing a function for XLA:
    for refusing, with a clear error, what does not compile (False where
    that cannot be told, so nothing is refused by mistake).

    Example:

    >>> surely_tracing_for_xla()
    False
    """
    return private_hooks.xla_tracing() is True


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
