"""How many slots each expert (or group) gets in a capacity dispatch."""

import math

import tensorflow as tf

from keras_moe import all_to_all


def slots_per_expert(x, factor, k, num_experts, min_capacity,
                     same_on_every_replica=False):
    """`ceil(factor * tokens * k / num_experts)` slots, at least
    `min_capacity`, at most the token count (which can drop nothing), and
    at least 1.

    Args:
        x: the tokens, `[tokens, ...]`.
        factor: float > 0, the capacity factor.
        k: int, the experts each token picks.
        num_experts: int, the experts (or groups) sharing the tokens.
        min_capacity: int >= 1, the fewest slots.
        same_on_every_replica: bool; inside a replica function of a
            strategy with several replicas, count the tokens of the replica
            with the most (a ragged last batch gives replicas different
            counts), so that every replica's slabs have one shape, as an
            all-to-all between them needs.

    Returns:
        A Python int when the token count is static (and need not be the
        same on every replica), else an int32 scalar tensor.

    Example:

    >>> slots_per_expert(tf.zeros([10, 3]), factor=1.0, k=2, num_experts=4,
    ...                  min_capacity=1)
    5
    """
    share = factor * k / num_experts
    num_tokens = x.shape[0]
    if same_on_every_replica and all_to_all.replica_layout()[0] == 1:
        same_on_every_replica = False
    if num_tokens is not None and not same_on_every_replica:
        return max(1, min(num_tokens, max(
            min_capacity, math.ceil(share * num_tokens))))
    num_tokens = tf.shape(x)[0]
    if same_on_every_replica:
        # (tf.distribute reduces only by SUM and MEAN.)
        counts = tf.distribute.get_replica_context().all_gather(
            tf.reshape(tf.cast(num_tokens, tf.float32), [1]), 0)
        num_tokens = tf.cast(tf.reduce_max(counts), tf.int32)
    wanted = tf.cast(
        tf.math.ceil(share * tf.cast(num_tokens, tf.float32)), tf.int32)
    return tf.maximum(
        1, tf.minimum(num_tokens, tf.maximum(min_capacity, wanted)))
