"""Sparse dispatch: the original `SparseDispatcher`, which sends each row
only to the experts whose gate for it is positive."""

import numpy as np
import tensorflow as tf

from keras_moe import validation, xla


class SparseDispatcher:
    """Routes rows to experts and combines the experts' outputs.

    The original `SparseDispatcher` (Shazeer et al. 2017,
    https://arxiv.org/abs/1701.06538). Expert `i` receives exactly the rows
    `b` with `gates[b, i] > 0`, in increasing `b`, and the combined output of
    row `b` is `sum_i gates[b, i] * expert_i(inputs[b])`. Shapes depend on the
    data: it works eagerly and inside `tf.function`, not under XLA.

    Args:
        num_experts: int >= 1.
        gates: a float tensor `[batch, num_experts]`, finite (NaN or
            infinity is an error); a row goes to the experts whose gate
            is > 0.

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
        xla.check_not_xla(
            "SparseDispatcher",
            "CapacityDispatcher has static shapes and does; or call this "
            "one without `jit_compile=True`.",
        )
        self._num_experts, gates = _check_gates(num_experts, gates)
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
        inp = _check_rows("inp", inp, tf.shape(self._gates)[0],
                          "one row per row of `gates`")
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
        stitched = _check_rows("stitched", stitched,
                               tf.size(self._nonzero_gates),
                               "one row per routed (row, expert) pair")
        return self._combine("stitched", stitched, multiply_by_gates)

    def _combine(self, name, stitched, multiply_by_gates):
        if multiply_by_gates:
            _check_weighable(name, stitched)
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
                `[part_sizes[i], ...]`, with the same trailing shape and
                dtype.
            multiply_by_gates: whether to weight each output by its gate.

        Returns:
            A tensor `[batch, ...]`.
        """
        if not isinstance(expert_out, (list, tuple)) or len(
            expert_out
        ) != self._num_experts:
            count = (
                f"{len(expert_out)} tensors"
                if isinstance(expert_out, (list, tuple))
                else f"expert_out of type {type(expert_out).__name__}"
            )
            raise ValueError(
                f"`expert_out` must be a list of one tensor per expert "
                f"({self._num_experts}). Received: {count}"
            )
        parts = []
        for i, out in enumerate(expert_out):
            name = f"expert_out[{i}]"
            out = _check_rows(
                name, validation.to_tensor(name, out), self._part_sizes[i],
                f"one row per row expert {i} received (part_sizes[{i}])",
            )
            if parts and (
                out.dtype != parts[0].dtype
                or not out.shape[1:].is_compatible_with(parts[0].shape[1:])
            ):
                raise ValueError(
                    f"Every `expert_out[i]` must have the dtype and trailing "
                    f"shape of `expert_out[0]` ({parts[0].dtype.name}, "
                    f"{tuple(parts[0].shape[1:])}). Received: "
                    f"{name}.dtype={out.dtype.name}, "
                    f"{name}.shape={tuple(out.shape)}"
                )
            parts.append(out)
        return self._combine(
            "expert_out", tf.concat(parts, 0), multiply_by_gates
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


class CapacityDispatcher:
    """Routes rows to experts with a fixed capacity: static shapes, for XLA.

    Every expert gets exactly `capacity` slots. Rows are queued at each
    expert in row order (row 0 first); a (row, expert) pair whose place in
    the queue is `capacity` or later is dropped, deterministically: the row
    keeps its other experts, and its output lacks that expert's share. With
    `capacity >= batch` nothing is dropped and `combine(f(dispatch(x)))`
    equals `SparseDispatcher`'s result.

    Index-based: the intermediates are `[batch, num_experts]` (queue
    positions) and `[batch, k]` (slots), never
    `[batch, num_experts, capacity]`.

    Args:
        num_experts: int >= 1.
        gates: a float tensor `[batch, num_experts]`, finite (NaN or
            infinity is an error); each row goes to (at most) its `k`
            largest positive gates, the rest are ignored.
        k: int, the most experts a row uses.
        capacity: int (or scalar int tensor) >= 1, slots per expert.
        expert_index: optional int tensor `[batch, k]`, the experts each row
            chose (a router's choice, not computed again); without it, the
            `k` largest gates.

    Example:

    >>> gates = tf.constant([[0.6, 0.4], [0.5, 0.5], [1.0, 0.0]])
    >>> dispatcher = CapacityDispatcher(2, gates, k=2, capacity=2)
    >>> dispatcher.dispatch(tf.constant([[1.0], [2.0], [3.0]]))[:, :, 0].numpy()
    array([[1., 2.],
           [1., 2.]], dtype=float32)
    >>> round(float(dispatcher.dropped_fraction), 4)  # 1 of 5 choices
    0.2
    """

    def __init__(self, num_experts, gates, k, capacity, expert_index=None):
        self._num_experts, gates = _check_gates(num_experts, gates)
        k = validation.check_int("k", k, 1, num_experts)
        capacity = _check_capacity(capacity)
        self._capacity = capacity
        self._gates = gates
        if expert_index is None:
            top_gates, expert_index = tf.math.top_k(gates, k)
        else:
            expert_index = tf.cast(expert_index, tf.int32)
            expert_index = tf.ensure_shape(
                expert_index, [gates.shape[0], k], name="expert_index")
            top_gates = tf.gather(gates, expert_index, batch_dims=1)
        active = top_gates > 0
        batch = tf.shape(gates)[0]
        # Which experts each row chose (its `k` largest positive gates):
        # only those queue, whatever else is positive.
        chosen = tf.scatter_nd(
            tf.stack([
                tf.repeat(tf.range(batch), k),
                tf.reshape(expert_index, [-1]),
            ], 1),
            tf.reshape(tf.cast(active, tf.int32), [-1]),
            tf.stack([batch, num_experts]),
        )
        # Each row's place in each expert's queue, in row order.
        queue_position = tf.cumsum(chosen, axis=0, exclusive=True)
        position = tf.gather(queue_position, expert_index, batch_dims=1)
        kept = active & (position < capacity)
        self._num_slots = num_experts * capacity
        # Dropped or unused choices point at one spare slot past the end,
        # which reads zeros.
        self._slot = tf.where(
            kept, expert_index * capacity + position, self._num_slots
        )
        self._slot_gates = tf.where(kept, top_gates, tf.zeros_like(top_gates))
        self._kept = kept
        self._expert_index = expert_index
        row_ids = tf.broadcast_to(tf.range(1, batch + 1)[:, None], tf.shape(kept))
        # The row (1-based; 0 = empty) each slot holds.
        self._slot_row = tf.scatter_nd(
            tf.expand_dims(self._slot, -1),
            tf.where(kept, row_ids, 0),
            [self._num_slots + 1],
        )[: self._num_slots]
        # Under XLA the check of `gates` does not run: a row with a NaN or
        # infinite gate combines to NaN instead of a finite wrong answer.
        self._bad_rows = (
            ~tf.reduce_all(tf.math.is_finite(gates), 1)
            if xla.maybe_tracing_for_xla() else None
        )
        num_active = tf.reduce_sum(tf.cast(active, tf.float32))
        num_dropped = num_active - tf.reduce_sum(tf.cast(kept, tf.float32))
        self._dropped_fraction = num_dropped / tf.maximum(num_active, 1.0)

    @property
    def capacity(self):
        return self._capacity

    @property
    def dropped_fraction(self):
        """float32 scalar: the share of (row, expert) choices dropped."""
        return self._dropped_fraction

    @property
    def part_sizes(self):
        """int32 `[num_experts]`: how many rows each expert really gets."""
        return tf.math.unsorted_segment_sum(
            tf.reshape(tf.cast(self._kept, tf.int32), [-1]),
            tf.reshape(self._expert_index, [-1]),
            self._num_experts,
        )

    def routed_pairs(self):
        """The kept (row, expert) pairs, sorted by expert then row.

        Returns `(expert_index, batch_index, gates)`, 1-D tensors whose
        length depends on the data (for inspection, not for XLA).
        """
        slot_row = self._slot_row
        used = tf.where(slot_row > 0)[:, 0]
        expert_index = tf.cast(used // tf.cast(self._capacity, tf.int64),
                               tf.int32)
        batch_index = tf.gather(slot_row, used) - 1
        gates = tf.gather_nd(
            self._gates, tf.stack([batch_index, expert_index], 1)
        )
        return expert_index, batch_index, gates

    def dispatch(self, inp):
        """The experts' inputs, `[num_experts, capacity, ...]`; empty slots
        are zero."""
        inp = _check_rows("inp", validation.to_tensor("inp", inp),
                          tf.shape(self._gates)[0],
                          "one row per row of `gates`")
        # One zero row in front (also when `inp` has no rows).
        padded = tf.pad(inp, [[1, 0]] + [[0, 0]] * (inp.shape.rank - 1))
        expert_inputs = tf.gather(padded, self._slot_row)
        return tf.reshape(
            expert_inputs,
            tf.concat([[self._num_experts, self._capacity],
                       tf.shape(inp)[1:]], 0),
        )

    def _check_slabs(self, expert_out):
        """`expert_out` checked to be `[num_experts, capacity, ...]`: static
        sizes now, a capacity known only at run time by an assertion op."""
        message = (
            f"`expert_out` must have shape [num_experts, capacity, ...] = "
            f"[{self._num_experts}, {_static_int(self._capacity)}, ...], "
            f"one slab of `capacity` rows per expert"
        )
        shape = tuple(expert_out.shape)
        capacity = _static_int(self._capacity)
        if len(shape) < 2 or shape[0] not in (None, self._num_experts) or (
            capacity is not None and shape[1] not in (None, capacity)
        ):
            raise ValueError(
                f"{message}. Received: expert_out.shape={shape}"
            )
        if tf.executing_eagerly():
            if int(tf.shape(expert_out)[1]) != int(self._capacity):
                raise ValueError(
                    f"{message}. Received: expert_out.shape={shape}"
                )
            return expert_out
        with tf.control_dependencies([tf.debugging.assert_equal(
            tf.shape(expert_out)[:2],
            tf.stack([self._num_experts, self._capacity]),
            message=message,
        )]):
            return tf.identity(expert_out)

    def combine(self, expert_out):
        """Gate-weighted sum per row of `expert_out [num_experts, capacity,
        ...]`; dropped choices add nothing."""
        expert_out = self._check_slabs(
            validation.to_tensor("expert_out", expert_out)
        )
        _check_weighable("expert_out", expert_out)
        flat = tf.reshape(
            expert_out,
            tf.concat([[self._num_slots], tf.shape(expert_out)[2:]], 0),
        )
        flat = tf.concat([flat, tf.zeros_like(flat[:1])], 0)
        gathered = tf.gather(flat, self._slot)  # [batch, k, ...]
        gates = tf.cast(self._slot_gates, expert_out.dtype)
        gates = tf.reshape(
            gates, tf.concat([tf.shape(gates),
                              tf.ones([gathered.shape.rank - 2], tf.int32)], 0)
        )
        combined = tf.reduce_sum(gathered * gates, axis=1)
        if self._bad_rows is not None:
            bad = tf.reshape(
                self._bad_rows,
                tf.concat([tf.shape(self._bad_rows),
                           tf.ones([combined.shape.rank - 1], tf.int32)], 0),
            )
            combined = tf.where(
                bad, tf.constant(float("nan"), combined.dtype), combined
            )
        return combined


def _check_rows(name, values, rows, what):
    """`values` as a tensor whose first dimension is `rows` (a scalar int
    tensor): checked now when eager, by an assertion op in a graph."""
    values = validation.to_tensor(name, values)
    message = f"`{name}` must have {what}"
    if values.shape.rank == 0:
        raise ValueError(f"{message}. Received: {name}.shape=()")
    if tf.executing_eagerly():
        if values.shape[0] != int(rows):
            raise ValueError(
                f"{message} ({int(rows)}). Received: "
                f"{name}.shape={tuple(values.shape)}"
            )
        return values
    with tf.control_dependencies(
        [tf.debugging.assert_equal(tf.shape(values)[0], rows, message=message)]
    ):
        return tf.identity(values)


def _check_weighable(name, values):
    """Expert outputs to be weighted by float gates must be floats: a cast
    of the gates to integers would truncate them."""
    if not values.dtype.is_floating:
        raise TypeError(
            f"`{name}` must be floating-point to be weighted by the gates. "
            f"Received: {name}.dtype={values.dtype.name}"
        )


def _static_int(value):
    """`value` as a Python int if it is known now, else None."""
    if isinstance(value, int):
        return value
    static = tf.get_static_value(value)
    return None if static is None else int(static)


def _check_capacity(capacity):
    """`capacity`, an int >= 1 or a scalar integer tensor (int32)."""
    if isinstance(capacity, (int, np.integer)) and not isinstance(
        capacity, bool
    ):
        return validation.check_int("capacity", int(capacity), 1)
    if not tf.is_tensor(capacity):
        raise TypeError(
            f"`capacity` must be an int or a scalar integer tensor. "
            f"Received: capacity={capacity!r}"
        )
    if not capacity.dtype.is_integer or capacity.shape.rank != 0:
        raise TypeError(
            f"`capacity` must be a scalar integer tensor. Received: "
            f"capacity.dtype={capacity.dtype.name}, "
            f"capacity.shape={capacity.shape}"
        )
    capacity = tf.cast(capacity, tf.int32)
    if tf.executing_eagerly() and int(capacity) < 1:
        raise ValueError(
            f"`capacity` must be >= 1. Received: capacity={int(capacity)}"
        )
    return capacity


def _check_gates(num_experts, gates):
    """`(num_experts, gates)` checked: an int >= 1 and a float
    `[batch, num_experts]` tensor."""
    num_experts = validation.check_int("num_experts", num_experts, 1)
    gates = validation.check_float_tensor("gates", gates)
    if gates.shape.rank != 2 or gates.shape[1] not in (None, num_experts):
        raise ValueError(
            f"`gates` must have shape [batch, num_experts={num_experts}]. "
            f"Received: gates.shape={gates.shape}"
        )
    # A NaN gate is neither > 0 nor not: it would route its row nowhere
    # without a word (and an infinite one make its output infinite).
    return num_experts, validation.check_finite("gates", gates)
