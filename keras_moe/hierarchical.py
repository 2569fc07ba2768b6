"""The two-level Sparsely-Gated Mixture-of-Experts layer: the original
hierarchical `DistributedMixtureOfExperts` as a Keras layer."""

import keras
import tensorflow as tf

from keras_moe import balance, validation, xla
from keras_moe.dispatch import SparseDispatcher
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
        **kwargs,
    ):
        super().__init__(
            loss_coef=loss_coef,
            cross_replica_balance=cross_replica_balance,
            routing_metrics=routing_metrics,
            **kwargs,
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
            hidden_activation, autoscale, expert_initializer)

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
        statistics = {
            "importance": tf.math.unsorted_segment_sum(
                group_gates, group_of_row, self.num_groups),
            "secondary_load": tf.math.unsorted_segment_sum(
                row_load, group_of_row, self.num_groups),
            "primary_smooth_load": primary_smooth_load,
            "primary_true_load": primary_true_load,
        }
        # The routed (row, expert) pairs by flat expert index
        # i * experts_per_group + j, then by row (so by token).
        routed = tf.cast(tf.where(tf.transpose(group_gates) > 0), tf.int32)
        expert_in_group, row = tf.unstack(routed, num=2, axis=1)
        by_group = tf.argsort(tf.gather(group_of_row, row), stable=True)
        expert_in_group = tf.gather(expert_in_group, by_group)
        row = tf.gather(row, by_group)
        expert_index = (tf.gather(group_of_row, row) * self.experts_per_group
                        + expert_in_group)
        batch_index = tf.gather(token_of_row, row)
        expert_gates = tf.gather_nd(
            group_gates, tf.stack([row, expert_in_group], 1))
        part_sizes = tf.reshape(tf.math.unsorted_segment_sum(
            tf.cast(group_gates > 0, tf.int32), group_of_row,
            self.num_groups), [-1])
        expert_outputs = self.experts(
            tf.cast(tf.gather(x, batch_index), self.compute_dtype), part_sizes
        )
        weighted = expert_outputs * tf.expand_dims(
            tf.cast(expert_gates, expert_outputs.dtype), 1)
        outputs = tf.math.unsorted_segment_sum(
            weighted, batch_index, tf.shape(x)[0])

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
            dropped_fraction=None,
        )

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
        }
        return {**base_config, **config}
