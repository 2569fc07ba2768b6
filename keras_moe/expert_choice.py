"""Expert-choice dispatch (Zhou et al. 2022): each expert's slots hold the
tokens it chose, so the dispatch reads them and the combine adds each
slot's output back to its token. Static shapes, for XLA."""

import tensorflow as tf

from keras_moe import validation


class ExpertChoiceDispatcher:
    """Routes tokens to the experts that chose them and combines the outputs.

    From Zhou et al. (2022), "Mixture-of-Experts with Expert Choice Routing"
    (https://arxiv.org/abs/2202.09368): expert `e`'s slot `c` holds token
    `token_index[e, c]` with gate `token_gates[e, c]`; the output of token
    `t` is `sum over slots (e, c) holding t of token_gates[e, c] *
    expert_e(x[t])`, zero for a token no expert took. A slot holding
    `num_tokens` is empty (it reads zeros and adds nothing).

    Index-based, like `CapacityDispatcher`: no `[tokens, num_experts,
    capacity]` intermediate.

    Args:
        num_experts: int >= 1.
        token_index: int32 tensor `[num_experts, capacity]`, what
            `ExpertChoiceRouter` returns.
        token_gates: float32 tensor `[num_experts, capacity]`.
        num_tokens: int or int32 scalar tensor, the tokens routed.

    Example:

    >>> dispatcher = ExpertChoiceDispatcher(
    ...     2, tf.constant([[0, 2], [1, 3]]),
    ...     tf.constant([[0.5, 1.0], [0.25, 0.0]]), num_tokens=3)
    >>> x = tf.constant([[1.0], [2.0], [3.0]])
    >>> dispatcher.dispatch(x)[:, :, 0].numpy().tolist()
    [[1.0, 3.0], [2.0, 0.0]]
    >>> dispatcher.combine(dispatcher.dispatch(x))[:, 0].numpy().tolist()
    [0.5, 0.5, 3.0]
    """

    def __init__(self, num_experts, token_index, token_gates, num_tokens):
        self._num_experts = validation.check_int("num_experts", num_experts, 1)
        token_index = validation.to_tensor("token_index", token_index)
        token_gates = validation.check_float_tensor("token_gates", token_gates)
        for name, value in (("token_index", token_index),
                            ("token_gates", token_gates)):
            if value.shape.rank != 2 or value.shape[0] not in (
                    None, num_experts):
                raise ValueError(
                    f"`{name}` must have shape [num_experts={num_experts}, "
                    f"capacity]. Received: {name}.shape={value.shape}"
                )
        self._token_index = tf.cast(token_index, tf.int32)
        self._token_gates = tf.cast(token_gates, tf.float32)
        self._num_tokens = num_tokens
        self._used = self._token_index < num_tokens
        self._capacity = tf.shape(self._token_index)[1]

    @property
    def part_sizes(self):
        """int32 `[num_experts]`: the tokens each expert holds."""
        return tf.reduce_sum(tf.cast(self._used, tf.int32), 1)

    @property
    def used(self):
        """bool `[num_experts, capacity]`: which slots hold a token."""
        return self._used

    def dispatch(self, inp):
        """The experts' inputs `[num_experts, capacity, ...]`; empty slots
        are zero."""
        inp = validation.to_tensor("inp", inp)
        # One zero row past the last token, read by the empty slots.
        padded = tf.pad(inp, [[0, 1]] + [[0, 0]] * (inp.shape.rank - 1))
        return tf.gather(padded, self._token_index)

    def combine(self, expert_out):
        """Gate-weighted sum per token of `expert_out [num_experts,
        capacity, ...]`: `[num_tokens, ...]`."""
        expert_out = validation.to_tensor("expert_out", expert_out)
        if not expert_out.dtype.is_floating:
            raise TypeError(
                "`expert_out` must be floating-point to be weighted by the "
                f"gates. Received: expert_out.dtype={expert_out.dtype.name}"
            )
        gates = tf.cast(self._token_gates, expert_out.dtype)
        gates = tf.reshape(
            gates, tf.concat([tf.shape(gates),
                              tf.ones([expert_out.shape.rank - 2], tf.int32)],
                             0))
        weighted = expert_out * gates
        flat = tf.reshape(
            weighted, tf.concat([[-1], tf.shape(expert_out)[2:]], 0))
        return tf.math.unsorted_segment_sum(
            flat, tf.reshape(self._token_index, [-1]), self._num_tokens + 1
        )[: self._num_tokens]

    def gates(self):
        """float32 `[num_tokens, num_experts]`: each token's gate for each
        expert (0 where the expert did not take it)."""
        experts = tf.broadcast_to(
            tf.range(self._num_experts)[:, None], tf.shape(self._token_index))
        return tf.scatter_nd(
            tf.stack([self._token_index, experts], -1),
            self._token_gates,
            tf.stack([self._num_tokens + 1, self._num_experts]),
        )[: self._num_tokens]

    def taken(self):
        """bool `[num_tokens]`: whether some expert took each token."""
        return tf.math.unsorted_segment_sum(
            tf.reshape(tf.cast(self._used, tf.int32), [-1]),
            tf.reshape(self._token_index, [-1]),
            self._num_tokens + 1,
        )[: self._num_tokens] > 0

    def routed_pairs(self):
        """The (token, expert) pairs held, sorted by expert then token:
        `(expert_index, batch_index, gates)`, 1-D tensors whose length
        depends on the data (for inspection, not for XLA)."""
        order = tf.argsort(self._token_index, axis=1, stable=True)
        token_index = tf.gather(self._token_index, order, batch_dims=1)
        gates = tf.gather(self._token_gates, order, batch_dims=1)
        experts = tf.broadcast_to(
            tf.range(self._num_experts)[:, None], tf.shape(token_index))
        used = token_index < self._num_tokens
        return (tf.boolean_mask(experts, used),
                tf.boolean_mask(token_index, used),
                tf.boolean_mask(gates, used))
