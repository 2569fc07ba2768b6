"""Which tokens each expert received, from a layer's routing report: the
original's `expert_to_identifiers` and `expert_to_gates`."""

import collections.abc

import tensorflow as tf

from keras_moe import validation


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
    token_index = _routing_entry(routing, "token_index")
    if identifiers is not None:
        identifiers = validation.to_tensor("identifiers", identifiers)
        gates = _routing_entry(routing, "gates")
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
    return _split_by_expert(
        _routing_entry(routing, "expert_gates"), routing, "expert_gates"
    )


_KEYS = ("gates", "part_sizes", "token_index", "expert_gates")


def _routing_entry(routing, key):
    """`routing[key]` as a tensor, `routing` checked to be a report."""
    if not isinstance(routing, collections.abc.Mapping):
        raise TypeError(
            "`routing` must be the dict a MoE layer returns with "
            f"`return_routing=True`. Received: routing of type "
            f"{type(routing).__name__}"
        )
    missing = [k for k in _KEYS if k not in routing]
    if missing:
        raise ValueError(
            "`routing` must be the dict a MoE layer returns with "
            f"`return_routing=True`, with the keys {list(_KEYS)}. "
            f"Received: a dict without {missing} (keys: "
            f"{sorted(routing)})"
        )
    return validation.to_tensor(f"routing['{key}']", routing[key])


def _split_by_expert(values, routing, values_key="token_index"):
    part_sizes = _routing_entry(routing, "part_sizes")
    gates = _routing_entry(routing, "gates")
    num_experts = gates.shape[-1] if gates.shape.rank else None
    if not part_sizes.dtype.is_integer:
        raise TypeError(
            "`routing['part_sizes']` must be an integer tensor. Received: "
            f"routing['part_sizes'].dtype={part_sizes.dtype.name}"
        )
    if tuple(part_sizes.shape) != (num_experts,):
        # What `model.predict` gives: the reports of its batches joined.
        raise ValueError(
            f"`routing` must be the report of one call: `part_sizes` must "
            f"have one entry per expert ({num_experts}). Received: "
            f"part_sizes.shape={tuple(part_sizes.shape)}. `model.predict` "
            "joins the reports of its batches; call the model on one batch "
            "instead."
        )
    # One entry per routed pair: as many as `part_sizes` counts.
    message = (
        f"`routing` is inconsistent: `routing['{values_key}']` must have "
        f"one entry per routed (token, expert) pair, sum(part_sizes), and "
        f"`part_sizes` must be >= 0"
    )
    total = tf.reduce_sum(part_sizes)
    rows = tf.shape(values)[0] if values.shape.rank else 0
    if tf.executing_eagerly():
        if values.shape.rank == 0 or int(rows) != int(total) or bool(
            tf.reduce_any(part_sizes < 0)
        ):
            raise ValueError(
                f"{message}. Received: routing['{values_key}'].shape="
                f"{tuple(values.shape)}, part_sizes="
                f"{part_sizes.numpy().tolist()}"
            )
    else:
        with tf.control_dependencies([
            tf.debugging.assert_equal(
                tf.cast(rows, part_sizes.dtype), total, message=message),
            tf.debugging.assert_non_negative(part_sizes, message=message),
        ]):
            values = tf.identity(values)
    return tf.split(values, part_sizes, num=num_experts, axis=0)
