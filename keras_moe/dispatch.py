"""Sparse dispatch: the original `SparseDispatcher`, which sends each row
only to the experts whose gate for it is positive."""

import tensorflow as tf

from keras_moe import validation


class SparseDispatcher:
    """Routes rows to experts and combines the experts' outputs.

    The original `SparseDispatcher` (Shazeer et al. 2017,
    https://arxiv.org/abs/1701.06538). Expert `i` receives exactly the rows
    `b` with `gates[b, i] > 0`, in increasing `b`, and the combined output of
    row `b` is `sum_i gates[b, i] * expert_i(inputs[b])`. Shapes depend on the
    data: it works eagerly and inside `tf.function`, not under XLA.

    Args:
        num_experts: int >= 1.
        gates: a float tensor `[batch, num_experts]`.

    Example:

    >>> gates = tf.constant([[0.7, 0.3, 0.0], [0.0, 0.0, 1.0]])
    >>> dispatcher = SparseDispatcher(3, gates)
    >>> inputs = tf.constant([[1.0, 2.0], [3.0, 4.0]])
    >>> parts = dispatcher.dispatch(inputs)
    >>> [p.shape[0] for p in parts]
    [1, 1, 1]
    >>> dispatcher.combine([2.0 * p for p in parts]).numpy().tolist()
    [[2.0, 4.0], [6.0, 8.0]]
    """

    def __init__(self, num_experts, gates):
        self._num_experts = validation.check_int("num_experts", num_experts, 1)
        gates = validation.check_float_tensor("gates", gates)
        if gates.shape.rank != 2 or gates.shape[1] not in (None, num_experts):
            raise ValueError(
                f"`gates` must have shape [batch, num_experts={num_experts}]. "
                f"Received: gates.shape={gates.shape}"
            )
        self._gates = gates
        # Sorted by expert, then by row: expert i's rows are contiguous.
        where = tf.cast(tf.where(tf.transpose(gates) > 0), tf.int32)
        self._expert_index, self._batch_index = tf.unstack(where, num=2, axis=1)
        self._part_sizes = tf.reduce_sum(tf.cast(gates > 0, tf.int32), 0)
        self._nonzero_gates = tf.gather(
            tf.reshape(gates, [-1]),
            self._batch_index * num_experts + self._expert_index,
        )

    @property
    def num_experts(self):
        return self._num_experts

    @property
    def part_sizes(self):
        """int32 `[num_experts]`: how many rows each expert receives."""
        return self._part_sizes

    @property
    def expert_index(self):
        """int32 `[routed]`: the expert of each routed (row, expert) pair."""
        return self._expert_index

    @property
    def batch_index(self):
        """int32 `[routed]`: the row of each routed (row, expert) pair."""
        return self._batch_index

    @property
    def nonzero_gates(self):
        """`[routed]`: the gate of each routed (row, expert) pair."""
        return self._nonzero_gates

    def dispatch_concatenated(self, inp):
        """All experts' inputs in one tensor `[routed, ...]`, expert by expert.

        Rows `sum(part_sizes[:i])` to `sum(part_sizes[:i + 1])` go to
        expert `i`.
        """
        return tf.gather(inp, self._batch_index)

    def dispatch(self, inp):
        """One input tensor per expert.

        Args:
            inp: a tensor `[batch, ...]` of any dtype.

        Returns:
            A list of `num_experts` tensors `[part_sizes[i], ...]`: the rows
            `b` of `inp` with `gates[b, i] > 0`.
        """
        return tf.split(
            self.dispatch_concatenated(inp),
            self._part_sizes,
            num=self._num_experts,
            axis=0,
        )

    def combine_concatenated(self, stitched, multiply_by_gates=True):
        """Combines the experts' outputs given as one `[routed, ...]` tensor.

        Args:
            stitched: the experts' outputs, expert by expert, in the order of
                `dispatch_concatenated`.
            multiply_by_gates: whether to weight each output by its gate.

        Returns:
            A tensor `[batch, ...]`: row `b` is the (gate-weighted) sum of
            the outputs for row `b`; rows routed nowhere are zero.
        """
        if multiply_by_gates:
            gates = tf.cast(self._nonzero_gates, stitched.dtype)
            # One gate per row, broadcast over the trailing axes.
            gates = tf.reshape(gates, [-1] + [1] * (stitched.shape.rank - 1))
            stitched = stitched * gates
        return tf.math.unsorted_segment_sum(
            stitched, self._batch_index, tf.shape(self._gates)[0]
        )

    def combine(self, expert_out, multiply_by_gates=True):
        """Sums the experts' outputs per row, weighted by the gates.

        Args:
            expert_out: a list of `num_experts` tensors
                `[part_sizes[i], ...]`.
            multiply_by_gates: whether to weight each output by its gate.

        Returns:
            A tensor `[batch, ...]`.
        """
        if len(expert_out) != self._num_experts:
            raise ValueError(
                f"`expert_out` must hold one tensor per expert "
                f"({self._num_experts}). Received: {len(expert_out)} tensors"
            )
        return self.combine_concatenated(
            tf.concat(expert_out, 0), multiply_by_gates
        )

    def expert_to_gates(self):
        """The gate of each row each expert received.

        Returns:
            A list of `num_experts` 1-D tensors `[part_sizes[i]]`.
        """
        return tf.split(
            self._nonzero_gates, self._part_sizes, num=self._num_experts,
            axis=0,
        )
