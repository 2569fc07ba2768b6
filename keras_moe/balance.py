"""Load-balancing statistics: the original's `CVSquared`, `MaxOverload` and
`_GatesToLoad`, and the losses of today's routers (the Switch
Transformer's balancing loss, ST-MoE's router z-loss), computed in
float32."""

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


def switch_loss(load, mean_probability):
    """The balancing loss of the Switch Transformer, `E * sum_i f_i * P_i`.

    From Fedus et al. (2021), "Switch Transformers"
    (https://arxiv.org/abs/2101.03961), equation (4), as Mixtral and
    Qwen-MoE use it with top-k routing: `f_i` is the fraction of the routed
    (token, expert) pairs that went to expert `i` (`load / sum(load)`; with
    top-k, the count over `k * tokens`), `P_i` the mean router probability
    of expert `i`. It is 1 when both are uniform, up to `E` when one expert
    takes everything; its gradient flows through `P` only. 0 when nothing
    was routed.

    Args:
        load: a real tensor `[num_experts]`, the routed pairs per expert
            (any scale: only the fractions count).
        mean_probability: a real tensor `[num_experts]`, the mean router
            probability of each expert over the tokens.

    Returns:
        A float32 scalar.

    Example:

    >>> float(switch_loss([2.0, 2.0], [0.5, 0.5]))
    1.0
    >>> float(switch_loss([4.0, 0.0], [1.0, 0.0]))
    2.0
    """
    load = tf.stop_gradient(_as_float32("load", load))
    mean_probability = _as_float32("mean_probability", mean_probability)
    for name, x in (("load", load), ("mean_probability", mean_probability)):
        if x.shape.rank is not None and x.shape.rank != 1:
            raise ValueError(
                f"`{name}` must have rank 1 ([num_experts]). Received: "
                f"{name}.shape={x.shape}"
            )
    num_experts = tf.cast(tf.size(load), tf.float32)
    fraction = load / tf.maximum(tf.reduce_sum(load), 1e-10)
    return num_experts * tf.reduce_sum(fraction * mean_probability)


def router_z_loss(logits):
    """The router z-loss of ST-MoE: the mean over tokens of
    `logsumexp(logits)^2`.

    From Zoph et al. (2022), "ST-MoE: Designing Stable and Transferable
    Sparse Expert Models" (https://arxiv.org/abs/2202.08906), equation (5):
    it keeps the router's logits small, so that its softmax stays
    numerically stable. 0 for no tokens.

    Args:
        logits: a real tensor `[tokens, num_experts]`.

    Returns:
        A float32 scalar.

    Example:

    >>> round(float(router_z_loss([[0.0, 0.0]])), 4)  # log(2)^2
    0.4805
    """
    logits = _as_float32("logits", logits)
    if logits.shape.rank is not None and logits.shape.rank != 2:
        raise ValueError(
            "`logits` must have rank 2 ([tokens, num_experts]). "
            f"Received: logits.shape={logits.shape}"
        )
    total = tf.reduce_sum(tf.square(tf.reduce_logsumexp(logits, 1)))
    return total / tf.maximum(tf.cast(tf.shape(logits)[0], tf.float32), 1.0)


def _as_float32(name, x):
    x = validation.to_tensor(name, x)
    if not (x.dtype.is_floating or x.dtype.is_integer) or x.dtype.is_bool:
        raise TypeError(
            f"`{name}` must be a real-valued tensor. Received: "
            f"{name}.dtype={x.dtype.name}"
        )
    return tf.cast(x, tf.float32)
