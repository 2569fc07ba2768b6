"""Load-balancing statistics: the original's `CVSquared`, `MaxOverload` and
`_GatesToLoad`, computed in float32."""

import tensorflow as tf

from keras_moe import validation


def cv_squared(x):
    """The squared coefficient of variation of a sample.

    The original `CVSquared`: population variance over the squared mean, with
    the original's epsilons, so it is 0 for an empty or an all-zero tensor.
    Used as a loss that pushes a positive distribution toward uniform.

    Args:
        x: a real tensor of any shape (typically importance or load, `[n]`).

    Returns:
        A float32 scalar.

    Example:

    >>> float(cv_squared([1.0, 1.0, 1.0, 1.0]))
    0.0
    >>> round(float(cv_squared([4.0, 0.0, 0.0, 0.0])), 4)
    3.0
    """
    x = _as_float32("x", x)
    epsilon = 1e-10
    float_size = tf.cast(tf.size(x), tf.float32) + epsilon
    mean = tf.reduce_sum(x) / float_size
    variance = tf.reduce_sum(tf.square(x - mean)) / float_size
    return variance / (tf.square(mean) + epsilon)


def max_overload(load):
    """The load of the hardest-hit device relative to the average.

    The original `MaxOverload`: sums `load` over every axis but the first
    (axis 0 indexes devices, or groups of experts), then divides the maximum
    by the mean. 1.0 means perfectly balanced.

    Args:
        load: a real tensor of rank >= 1, e.g. `[num_experts]` or
            `[num_groups, experts_per_group]`.

    Returns:
        A float32 scalar.

    Example:

    >>> float(max_overload([2.0, 2.0, 2.0, 2.0]))
    1.0
    >>> float(max_overload([[3.0, 1.0], [0.0, 0.0]]))
    2.0
    """
    load = _as_float32("load", load)
    if load.shape.rank is not None and load.shape.rank < 1:
        raise ValueError(
            f"`load` must have rank >= 1. Received: load.shape={load.shape}"
        )
    per_device_load = tf.reduce_sum(
        tf.reshape(load, [tf.shape(load)[0], -1]), 1
    )
    return tf.reduce_max(per_device_load) / (
        tf.reduce_mean(per_device_load) + 1e-10
    )


def gates_to_load(gates):
    """The true load per expert: how many rows have a gate > 0 for it.

    The original `_GatesToLoad`.

    Args:
        gates: a real tensor `[batch, num_experts]`.

    Returns:
        A float32 tensor `[num_experts]`.

    Example:

    >>> gates_to_load([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]).numpy().tolist()
    [2.0, 1.0, 0.0]
    """
    gates = _as_float32("gates", gates)
    if gates.shape.rank is not None and gates.shape.rank != 2:
        raise ValueError(
            "`gates` must have rank 2 ([batch, num_experts]). "
            f"Received: gates.shape={gates.shape}"
        )
    return tf.reduce_sum(tf.cast(gates > 0, tf.float32), 0)


def _as_float32(name, x):
    x = validation.to_tensor(name, x)
    if not (x.dtype.is_floating or x.dtype.is_integer) or x.dtype.is_bool:
        raise TypeError(
            f"`{name}` must be a real-valued tensor. Received: "
            f"{name}.dtype={x.dtype.name}"
        )
    return tf.cast(x, tf.float32)
