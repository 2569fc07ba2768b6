"""Distinct draws from one initializer, for layers that make several
weights (or a stack of per-expert weights) from a single argument."""

import tensorflow as tf


def reseeded(initializer, offset):
    """`initializer` drawing its own stream, `offset` seeds further on.

    A Keras random initializer keeps a fixed integer seed (one it was given,
    or one drawn when it was made), so calling it twice for two weights of
    one shape gives them the same values. A clone with `seed + offset` does
    not. Initializers without an integer seed are returned unchanged.
    """
    seed = getattr(initializer, "seed", None)
    if offset == 0 or not isinstance(seed, int) or isinstance(seed, bool):
        return initializer
    config = initializer.get_config()
    return type(initializer).from_config({**config, "seed": seed + offset})


def stacked(initializer, num_stacked, offset=0):
    """An initializer for `[num_stacked, *shape]`, one slice at a time.

    Each slice is drawn as if it were its own `shape` variable (so
    variance-scaling initializers use one slice's fan-in and fan-out, not
    the stack's) with its own seed, `offset + i`.
    """

    def initialize(shape, dtype=None):
        slice_shape = tuple(shape[1:])
        return tf.stack(
            [
                reseeded(initializer, offset + i)(slice_shape, dtype=dtype)
                for i in range(num_stacked)
            ]
        )

    return initialize
