"""Which tokens each expert received, from a layer's routing report: the
original's `expert_to_identifiers` and `expert_to_gates`."""

import tensorflow as tf


def expert_to_tokens(routing, identifiers=None):
    """The tokens each expert received, in the order it received them.

    Args:
        routing: the dict a `MixtureOfExperts` or
            `HierarchicalMixtureOfExperts` returns with
            `return_routing=True`.
        identifiers: optional tensor of any dtype whose leading shape is the
            layer's input leading shape (`inputs.shape[:-1]`), with any
            trailing shape: a name, id or position per token. Without it,
            tokens are given by their index in the inputs flattened over
            their leading axes.

    Returns:
        A list with one tensor per expert (flat index
        `group * experts_per_group + j` for the hierarchical layer): the
        identifiers (or flat indices, int64) of the tokens sent to it.
        Masked tokens appear nowhere.

    Example:

    >>> import keras_moe
    >>> moe = keras_moe.MixtureOfExperts(num_experts=3, k=1,
    ...                                  gate_initializer="random_normal")
    >>> _, routing = moe(np.random.rand(2, 4, 5).astype("float32"),
    ...                  return_routing=True)
    >>> words = tf.constant([["the", "cat", "sat", "."],
    ...                      ["a", "dog", "ran", "!"]])
    >>> per_expert = expert_to_tokens(routing, words)
    >>> sorted(sum((t.numpy().tolist() for t in per_expert), []))[:3]
    [b'!', b'.', b'a']
    """
    token_index = routing["token_index"]
    if identifiers is not None:
        identifiers = tf.convert_to_tensor(identifiers)
        gates = tf.convert_to_tensor(routing["gates"])
        leading_rank = gates.shape.rank - 1
        leading_shape = tf.shape(gates)[:-1]
        static_leading = tuple(gates.shape[:-1])
        if identifiers.shape.rank is None or (
            identifiers.shape.rank < leading_rank
        ) or any(
            a is not None and b is not None and a != b
            for a, b in zip(identifiers.shape[:leading_rank], static_leading)
        ):
            raise ValueError(
                "`identifiers` must have the inputs' leading shape "
                f"{static_leading} in front. Received: "
                f"identifiers.shape={tuple(identifiers.shape)}"
            )
        tf.debugging.assert_equal(
            tf.shape(identifiers)[:leading_rank], leading_shape,
            message="`identifiers` must have the inputs' leading shape",
        )
        flat = tf.reshape(
            identifiers,
            tf.concat([[-1], tf.shape(identifiers)[leading_rank:]], 0),
        )
        token_index = tf.gather(flat, token_index)
    return _split_by_expert(token_index, routing)


def expert_to_gates(routing):
    """The gate of each token each expert received.

    Args:
        routing: a layer's routing report (`return_routing=True`).

    Returns:
        A list with one float32 tensor per expert, parallel to
        `expert_to_tokens(routing)`.
    """
    return _split_by_expert(routing["expert_gates"], routing)


def _split_by_expert(values, routing):
    part_sizes = tf.convert_to_tensor(routing["part_sizes"])
    num_experts = routing["gates"].shape[-1]
    if tuple(part_sizes.shape) != (num_experts,):
        # What `model.predict` gives: the reports of its batches joined.
        raise ValueError(
            f"`routing` must be the report of one call: `part_sizes` must "
            f"have one entry per expert ({num_experts}). Received: "
            f"part_sizes.shape={tuple(part_sizes.shape)}. `model.predict` "
            "joins the reports of its batches; call the model on one batch "
            "instead."
        )
    return tf.split(values, part_sizes, num=num_experts, axis=0)
