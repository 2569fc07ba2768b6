"""The two-level Sparsely-Gated Mixture-of-Experts layer: the original
hierarchical `DistributedMixtureOfExperts` as a Keras layer."""

import keras
import tensorflow as tf

from keras_moe import (
    all_to_all, balance, capacity, expert_shards, grouped_feed_forward,
    validation, xla,
)
from keras_moe.dispatch import CapacityDispatcher, SparseDispatcher
from keras_moe.gating import NoisyTopKGating
from keras_moe.moe import MixtureOfExperts
from keras_moe.secondary_gating import SecondaryGating
from keras_moe.sparse_mixture import Routed, _experts, _SparseMixtureBase


@keras.saving.register_keras_serializable(package="keras_moe")
class HierarchicalMixtureOfExperts(_SparseMixtureBase):
    """Two-level (hierarchical) Sparsely-Gated Mixture-of-Experts layer.

    From Shazeer et al. (2017, https://arxiv.org/abs/1701.06538), appendix
    B; a port of the original `DistributedMixtureOfExperts` with a secondary
    gating network. A primary noisy top-k gating (`.primary_gating`) picks
    `k` of `num_groups` groups per token; each group picks `group_k` of its
    `experts_per_group` experts with its own noisy top-k gating
    (`.secondary_gating`). The primary gates multiply into the secondary gates
    (the original's `per_example_multiplier`), so the output is
    `sum_i sum_j primary[b, i] * secondary_i[b, j] * expert_ij(x[b])`.

    Importance and load are `[num_groups, experts_per_group]`: importance
    sums the combined gates; load is each group's secondary load rescaled
    by `primary_smooth_load / (primary_true_load + 1e-10)`, so that the
    primary gating also gets a balancing gradient. One balancing loss,
    `loss_coef * (cv_squared(importance) + cv_squared(load))`, covers the
    whole layer; the groups add none of their own.

    The groups' weights are stacked: `.secondary_gating.gate_kernel[i]`
    is group `i`'s gate kernel and `.experts` holds all `num_experts`
    experts, expert `(i, j)` at index `i * experts_per_group + j`; so the
    traced graph's size does not depend on `num_groups` or
    `experts_per_group`. `.groups[i]` gives group `i` as a standalone
    `MixtureOfExperts` (a copy).

    Args:
        num_groups: int >= 1, the number of groups (primary experts).
        experts_per_group: int >= 1.
        k: int in `[1, num_groups]`, groups per token.
        group_k: int in `[1, experts_per_group]`, experts per token in each
            group it reaches.
        output_dim, hidden_sizes, hidden_activation, autoscale,
        noisy_gating, noise_epsilon, loss_coef, gate_initializer,
        expert_initializer, cross_replica_balance, routing_metrics: as in
            `MixtureOfExperts`, for every group.
        seed: optional int; the primary gating's noise uses `seed` and
            the secondary gatings' `seed + 1`.
        dispatch: `"sparse"` (exact) or `"capacity"`: each group gets
            `capacity` slots, `ceil(capacity_factor * tokens * k /
            num_groups)` within `[min_capacity, tokens]` (with
            `eval_capacity_factor` in inference); a (token, group) choice
            past its group's capacity is dropped, in token order, and
            reported as `dropped_fraction`. Each group's secondary routing
            is exact.
        capacity_factor, eval_capacity_factor, min_capacity: as in
            `MixtureOfExperts`, for the groups.
        expert_parallel: bool; with `dispatch="capacity"`, built under a
            `tf.distribute.MirroredStrategy` of R replicas
            (`num_groups % R == 0`), replica `r` holds whole groups
            `[r * G / R, (r + 1) * G / R)`, their experts and those
            experts' optimizer slots; each group's slabs reach its
            replica by an all-to-all, its secondary routing and experts run
            there on the tokens of every replica, and the results come
            back by a second one (the paper's layout). Train with
            `keras_moe.ExpertParallelOptimizer`. See docs/distributed.md.
        **kwargs: base layer keyword arguments.

    Call arguments:
        inputs, training, mask, gate_multiplier, return_routing,
            inputs_mask: as in `MixtureOfExperts` (`gate_multiplier`
            scales the primary gates).
        gating_inputs: optional `[..., d_gate]`: the primary gate reads it;
            the groups' gates and experts read `inputs` (the original's
            `xs` and `shadow_xs`).
        noise: optional tuple `(primary, secondary)` of standard-normal
            draws, `inputs.shape[:-1] + (num_groups,)` and
            `inputs.shape[:-1] + (num_groups, experts_per_group)`; group
            `i` uses `secondary[..., i, :]` for the tokens it receives.

    Input shape:
        `(..., d)`.

    Output shape:
        `(..., output_dim)`.

    Returns:
        The outputs; with `return_routing=True`, `(outputs, routing)` with
        the keys of `MixtureOfExperts`, where expert `(i, j)` has the flat
        index `i * experts_per_group + j` (in `gates`, `part_sizes` and
        `expert_index`), `importance` and `load` are
        `(num_groups, experts_per_group)`.

    Example:

    >>> moe = HierarchicalMixtureOfExperts(num_groups=4, experts_per_group=4,
    ...                                    k=2, group_k=2, hidden_sizes=(16,))
    >>> y, routing = moe(np.random.rand(6, 8).astype("float32"),
    ...                  return_routing=True)
    >>> y.shape, routing["load"].shape, routing["gates"].shape
    (TensorShape([6, 8]), TensorShape([4, 4]), TensorShape([6, 16]))
    """

    def __init__(
        self,
        num_groups,
        experts_per_group,
        k=2,
        group_k=2,
        output_dim=None,
        hidden_sizes=(),
        hidden_activation="relu",
        autoscale=True,
        noisy_gating=True,
        noise_epsilon=1e-2,
        loss_coef=1e-2,
        gate_initializer="zeros",
        expert_initializer="glorot_uniform",
        seed=None,
        cross_replica_balance=True,
        routing_metrics=True,
        dispatch="sparse",
        capacity_factor=1.25,
        eval_capacity_factor=2.0,
        min_capacity=4,
        expert_parallel=False,
        **kwargs,
    ):
        super().__init__(
            loss_coef=loss_coef,
            cross_replica_balance=cross_replica_balance,
            routing_metrics=routing_metrics,
            **kwargs,
        )
        expert_parallel = self._init_dispatch(
            dispatch, capacity_factor, eval_capacity_factor, min_capacity,
            expert_parallel)
        if self._drops_tokens() and self.routing_metrics:
            self._routing_trackers["dropped_fraction"] = keras.metrics.Mean(
                name=f"{self.name}_dropped_fraction"
            )
        num_groups = validation.check_int("num_groups", num_groups, 1)
        experts_per_group = validation.check_int(
            "experts_per_group", experts_per_group, 1
        )
        validation.check_int("group_k", group_k, 1, experts_per_group)
        if seed is not None:
            validation.check_int("seed", seed, 0)
        self.seed = seed
        self.primary_gating = NoisyTopKGating(
            num_groups,
            k=k,
            noisy_gating=noisy_gating,
            noise_epsilon=noise_epsilon,
            kernel_initializer=gate_initializer,
            seed=seed,
            dtype=self.dtype_policy,
            name="primary_gating",
        )
        self.secondary_gating = SecondaryGating(
            num_groups,
            experts_per_group,
            k=group_k,
            noisy_gating=noisy_gating,
            noise_epsilon=noise_epsilon,
            kernel_initializer=gate_initializer,
            seed=None if seed is None else seed + 1,
            dtype=self.dtype_policy,
            name="secondary_gating",
        )
        # Expert (i, j) is expert i * experts_per_group + j.
        self.experts = _experts(
            self, num_groups * experts_per_group, output_dim, hidden_sizes,
            hidden_activation, autoscale, expert_initializer,
            expert_parallel=expert_parallel)

    @property
    def expert_parallel(self):
        return self.experts.expert_parallel

    def _drops_tokens(self):
        return self.dispatch == "capacity"

    @property
    def groups(self):
        """Group `i` as a standalone `MixtureOfExperts`, for each group.

        New layers each time, holding copies of the groups' weights (their
        `MixtureOfExperts` equals group `i` on the rows it receives, given
        the same noise); assigning to them does not change this layer,
        whose weights are `secondary_gating` and `experts`. Available once
        the layer is built.
        """
        if not self.built:
            raise ValueError(
                "`groups` copies the weights of a built layer: call the "
                "layer once or call `build` first."
            )
        gating, experts = self.secondary_gating, self.experts
        per_group = self.experts_per_group
        groups = []
        for i in range(self.num_groups):
            group = MixtureOfExperts(
                per_group,
                k=gating.k,
                output_dim=experts.output_dim,
                hidden_sizes=experts.hidden_sizes,
                hidden_activation=experts.hidden_activation,
                autoscale=experts.autoscale,
                noisy_gating=gating.noisy_gating,
                noise_epsilon=gating.noise_epsilon,
                loss_coef=0.0,  # the layer's one loss covers the groups
                routing_metrics=False,
                gate_initializer=gating.kernel_initializer,
                expert_initializer=experts.kernel_initializer,
                seed=None if self.seed is None else self.seed + 1 + i,
                dtype=self.dtype_policy,
                name=f"group_{i}",
            )
            group.build((None, self.input_dim))
            group.gating.gate_kernel.assign(gating.gate_kernel[i])
            if gating.noisy_gating:
                group.gating.noise_kernel.assign(gating.noise_kernel[i])
            for kernel, stacked in zip(group.experts.kernels,
                                       experts.kernels):
                kernel.assign(stacked[i * per_group:(i + 1) * per_group])
            groups.append(group)
        return groups

    @property
    def num_groups(self):
        return self.primary_gating.num_experts

    @property
    def experts_per_group(self):
        return self.secondary_gating.num_experts

    @property
    def gating_input_dim(self):
        return self.primary_gating.input_dim

    def _statistics_shape(self):
        return (self.num_groups, self.experts_per_group)

    def _noise_shapes(self):
        return [(self.num_groups,), (self.num_groups, self.experts_per_group)]

    def _noisy(self):
        return self.primary_gating.noisy_gating

    def _build_sublayers(self, input_dim, gating_dim):
        num_replicas = (tf.distribute.get_strategy().num_replicas_in_sync
                        if self.expert_parallel else 1)
        if self.num_groups % num_replicas:
            # Whole groups live on a replica: its secondary routing runs
            # there.
            raise ValueError(
                "`expert_parallel=True` puts whole groups on each replica "
                "and needs `num_groups` divisible by the number of "
                f"replicas. Received: num_groups={self.num_groups}, "
                f"replicas={num_replicas}"
            )
        self.primary_gating.build((None, gating_dim))
        self.secondary_gating.build((None, input_dim))
        self.experts.build((None, input_dim))

    def _route(self, x, gate_x, training, multiplier, noise, mask):
        xla.check_not_xla(
            "HierarchicalMixtureOfExperts (its sparse dispatch)",
            "Call it without `jit_compile=True`; a flat MixtureOfExperts "
            'with dispatch="capacity" compiles.',
        )
        primary_noise, secondary_noise = (None, None) if noise is None else noise
        primary_gates, primary_smooth_load = self.primary_gating(
            gate_x, training=training, noise=primary_noise, mask=mask
        )
        # Both primary loads before the multiplier: their ratio is the
        # gating's smoothing, and a token the multiplier zeroes reaches no
        # group, so it counts in no secondary load (nor in importance).
        primary_true_load = balance.gates_to_load(primary_gates)
        if multiplier is not None:
            primary_gates *= tf.expand_dims(multiplier, 1)
        if self.dispatch == "capacity":
            return self._route_by_capacity(
                x, primary_gates, primary_smooth_load, primary_true_load,
                training, secondary_noise)
        # Every group at once (weights stacked over groups), so that the
        # graph does not grow with the number of groups: the routed
        # (token, group) pairs, group by group, are the groups' rows.
        primary = SparseDispatcher(self.num_groups, primary_gates)
        group_of_row, token_of_row = primary.expert_index, primary.batch_index
        if secondary_noise is not None and self._noisy() and bool(training):
            # Each routed (token, group) pair reads its own noise row.
            secondary_noise = tf.gather_nd(
                tf.cast(secondary_noise, tf.float32),
                tf.stack([token_of_row, group_of_row], 1))
        group_gates, row_load = self.secondary_gating(
            primary.dispatch_concatenated(x), group_sizes=primary.part_sizes,
            training=training, noise=secondary_noise,
        )
        # The secondary gates carry the primary gates.
        group_gates *= tf.expand_dims(primary.nonzero_gates, 1)
        statistics = self._group_statistics(
            group_gates, row_load, group_of_row, primary_smooth_load,
            primary_true_load)
        expert_index, row, expert_gates, part_sizes = self._routed_pairs(
            group_gates, group_of_row)
        batch_index = tf.gather(token_of_row, row)
        expert_outputs = self.experts(
            tf.cast(tf.gather(x, batch_index), self.compute_dtype), part_sizes
        )
        weighted = expert_outputs * tf.expand_dims(
            tf.cast(expert_gates, expert_outputs.dtype), 1)
        outputs = tf.math.unsorted_segment_sum(
            weighted, batch_index, tf.shape(x)[0])
        return self._routed(x, outputs, statistics, expert_index, batch_index,
                            expert_gates, part_sizes, None)

    def _group_statistics(self, group_gates, row_load, group_of_row,
                          primary_smooth_load, primary_true_load):
        """The batch sums the balancing loss is made of, from the routed
        (token, group) rows: their combined gates `group_gates` and
        secondary loads `row_load`, `[rows, experts_per_group]`."""
        return {
            "importance": tf.math.unsorted_segment_sum(
                group_gates, group_of_row, self.num_groups),
            "secondary_load": tf.math.unsorted_segment_sum(
                row_load, group_of_row, self.num_groups),
            "primary_smooth_load": primary_smooth_load,
            "primary_true_load": primary_true_load,
        }

    def _routed_pairs(self, group_gates, group_of_row):
        """The routed (row, expert) pairs of rows sorted by group, by flat
        expert index `i * experts_per_group + j`, then by row: `(expert_index,
        row, expert_gates, part_sizes)`, `part_sizes` over every expert of
        every group."""
        routed = tf.cast(tf.where(tf.transpose(group_gates) > 0), tf.int32)
        expert_in_group, row = tf.unstack(routed, num=2, axis=1)
        by_group = tf.argsort(tf.gather(group_of_row, row), stable=True)
        expert_in_group = tf.gather(expert_in_group, by_group)
        row = tf.gather(row, by_group)
        expert_index = (tf.gather(group_of_row, row) * self.experts_per_group
                        + expert_in_group)
        expert_gates = tf.gather_nd(
            group_gates, tf.stack([row, expert_in_group], 1))
        part_sizes = tf.reshape(tf.math.unsorted_segment_sum(
            tf.cast(group_gates > 0, tf.int32), group_of_row,
            self.num_groups), [-1])
        return expert_index, row, expert_gates, part_sizes

    def _routed(self, x, outputs, statistics, expert_index, batch_index,
                expert_gates, part_sizes, dropped_fraction):
        def dense_gates():
            return tf.scatter_nd(
                tf.stack([batch_index, expert_index], 1),
                expert_gates,
                tf.stack([tf.shape(x)[0], self.num_experts]),
            )

        return Routed(
            outputs=outputs,
            statistics=statistics,
            part_sizes=part_sizes,
            pairs=lambda: (expert_index, batch_index, expert_gates),
            gates=dense_gates,
            dropped_fraction=dropped_fraction,
        )

    def _route_by_capacity(self, x, primary_gates, primary_smooth_load,
                           primary_true_load, training, secondary_noise):
        """The groups' slabs `[num_groups, capacity, d]` (the primary
        capacity dispatch) are routed and run where their group's experts
        live (with `expert_parallel`, on the group's replica, which the
        slabs reach by an all-to-all); the groups' outputs, secondary gates
        and loads come back the same way, and the statistics and routing
        report are made here, on the tokens' replica, as the sparse
        dispatch makes them."""
        sharded = self.experts.num_shards > 1
        dispatcher = CapacityDispatcher(
            self.num_groups, primary_gates, self.primary_gating.k,
            capacity.slots_per_expert(
                x,
                self.capacity_factor if training
                else self.eval_capacity_factor,
                self.primary_gating.k, self.num_groups, self.min_capacity,
                same_on_every_replica=sharded))
        # The (1-based) token each slot holds; 0: an empty slot.
        slot_token = tf.cast(dispatcher.dispatch(
            tf.range(1, tf.shape(x)[0] + 1)[:, None])[:, :, 0], tf.int32)
        noise_slabs = None
        if secondary_noise is not None and self._noisy() and bool(training):
            # Each slot's row of the (token, group) noise.
            noise_slabs = tf.gather(
                tf.transpose(tf.cast(secondary_noise, tf.float32), [1, 0, 2]),
                tf.maximum(slot_token - 1, 0), batch_dims=1)
        outputs, group_results = self._run_groups(
            tf.cast(dispatcher.dispatch(x), self.compute_dtype),
            tf.cast(slot_token > 0, tf.float32), noise_slabs, training)
        # The used slots, group by group, each in token order: the rows
        # of the sparse dispatch.
        used = tf.cast(tf.where(tf.reshape(slot_token, [-1]) > 0)[:, 0],
                       tf.int32)
        slot_capacity = tf.shape(slot_token)[1]
        group_of_row = used // slot_capacity
        token_of_row = tf.gather(tf.reshape(slot_token, [-1]), used) - 1
        group_results = tf.gather(
            tf.reshape(group_results, [-1, 2 * self.experts_per_group]), used)
        secondary_gates, row_load = tf.split(group_results, 2, axis=1)
        group_gates = secondary_gates * tf.expand_dims(tf.gather_nd(
            primary_gates, tf.stack([token_of_row, group_of_row], 1)), 1)
        statistics = self._group_statistics(
            group_gates, row_load, group_of_row, primary_smooth_load,
            primary_true_load)
        expert_index, row, expert_gates, part_sizes = self._routed_pairs(
            group_gates, group_of_row)
        return self._routed(
            x, dispatcher.combine(outputs), statistics, expert_index,
            tf.gather(token_of_row, row), expert_gates, part_sizes,
            dispatcher.dropped_fraction)

    def _run_groups(self, slabs, slot_used, noise_slabs, training):
        """Each group's secondary routing and experts on its slabs.

        Args:
            slabs: `[num_groups, capacity, d]`, this replica's tokens for
                each group.
            slot_used: float32 `[num_groups, capacity]`, 1 where a slot
                holds a token.
            noise_slabs: None, or the secondary noise of each slot,
                `[num_groups, capacity, experts_per_group]`.

        Returns:
            `(outputs, group_results)`: the groups' outputs for the slots,
            `[num_groups, capacity, output_dim]` (not yet weighted by the
            primary gates), and float32 `[num_groups, capacity,
            2 * experts_per_group]`, each slot's secondary gates then its
            secondary load.
        """
        num_groups, per_group = self.num_groups, self.experts_per_group
        num_replicas, replica_id = 1, 0
        if self.experts.num_shards > 1:
            num_replicas, replica_id = all_to_all.replica_layout()
        capacity_here = tf.shape(slabs)[1]
        groups_here = num_groups // num_replicas
        small = [slot_used[:, :, None]]
        if noise_slabs is not None:
            small.append(noise_slabs)
        small = tf.concat(small, 2)

        def to_owners(t):
            # [group, slot, ...] -> the slots of this replica's groups, of
            # every sending replica: [groups here * senders * slots, ...]
            t = tf.reshape(t, tf.concat(
                [[num_replicas, groups_here, capacity_here],
                 tf.shape(t)[2:]], 0))
            if num_replicas > 1:
                t = all_to_all.all_to_all(t)
            rank = t.shape.rank
            t = tf.transpose(t, [1, 0, 2] + list(range(3, rank)))
            return tf.reshape(t, tf.concat([[-1], tf.shape(t)[3:]], 0))

        def from_owners(t):
            t = tf.reshape(t, tf.concat(
                [[groups_here, num_replicas, capacity_here],
                 tf.shape(t)[1:]], 0))
            rank = t.shape.rank
            t = tf.transpose(t, [1, 0, 2] + list(range(3, rank)))
            if num_replicas > 1:
                t = all_to_all.all_to_all(t)
            return tf.reshape(t, tf.concat(
                [[num_groups, capacity_here], tf.shape(t)[3:]], 0))

        rows_x, rows_small = to_owners(slabs), to_owners(small)
        used = tf.cast(tf.where(rows_small[:, 0] > 0)[:, 0], tf.int32)
        slots_per_group = num_replicas * capacity_here
        group_of_row = (used // slots_per_group
                        + replica_id * groups_here)
        x = tf.gather(rows_x, used)
        noise = None
        if noise_slabs is not None:
            noise = tf.gather(rows_small[:, 1:], used)
        group_gates, row_load = self.secondary_gating(
            x, group_sizes=tf.math.bincount(
                group_of_row, minlength=num_groups, maxlength=num_groups),
            training=training, noise=noise,
        )
        expert_index, row, expert_gates, part_sizes = self._routed_pairs(
            group_gates, group_of_row)
        first_expert = replica_id * groups_here * per_group
        expert_outputs = self._run_experts(
            tf.gather(x, row),
            part_sizes[first_expert:first_expert + groups_here * per_group],
            replica_id if num_replicas > 1 else None, training)
        weighted = expert_outputs * tf.expand_dims(
            tf.cast(expert_gates, expert_outputs.dtype), 1)
        num_rows = tf.shape(rows_x)[0]
        outputs = tf.math.unsorted_segment_sum(
            weighted, tf.gather(used, row), num_rows)
        group_results = tf.scatter_nd(
            used[:, None], tf.concat([group_gates, row_load], 1),
            tf.stack([num_rows, 2 * per_group]))
        return from_owners(outputs), from_owners(group_results)

    def _run_experts(self, x, part_sizes, replica_id, training):
        """The experts on rows `x` sorted by expert: all of them,
        or (`replica_id` not None) replica `replica_id`'s shard of them."""
        x = tf.cast(x, self.compute_dtype)
        if replica_id is None:
            return self.experts(x, part_sizes)
        kernels = expert_shards.replica_kernels(
            self.experts, replica_id, training)
        return grouped_feed_forward.grouped_feed_forward(
            x, kernels, part_sizes, self.experts.between_layers)

    def _balance(self, statistics):
        # The original's rule: each group's load, scaled by how much more
        # (smoothly) the primary gate would send it than it truly sent.
        scale = statistics["primary_smooth_load"] / (
            statistics["primary_true_load"] + 1e-10
        )
        load = statistics["secondary_load"] * tf.expand_dims(scale, 1)
        return statistics["importance"], load

    def get_config(self):
        base_config = super().get_config()
        primary = self.primary_gating
        config = {
            **self._shared_config(primary),
            "num_groups": self.num_groups,
            "experts_per_group": self.experts_per_group,
            "k": primary.k,
            "group_k": self.secondary_gating.k,
            "seed": self.seed,
            **self._dispatch_config(),
        }
        return {**base_config, **config}
