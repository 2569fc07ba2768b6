"""The Sparsely-Gated Mixture-of-Experts layer: the original
`LocalMixtureOfExperts` as a Keras layer."""

import math

import keras
import tensorflow as tf

from keras_moe import all_to_all, validation, xla
from keras_moe.dispatch import CapacityDispatcher, SparseDispatcher
from keras_moe.gating import NoisyTopKGating
from keras_moe.sparse_mixture import Routed, _experts, _SparseMixtureBase


@keras.saving.register_keras_serializable(package="keras_moe")
class MixtureOfExperts(_SparseMixtureBase):
    """Sparsely-Gated Mixture-of-Experts layer.

    From Shazeer et al. (2017), "Outrageously Large Neural Networks: The
    Sparsely-Gated Mixture-of-Experts Layer"
    (https://arxiv.org/abs/1701.06538). Every position of the input (all
    axes but the last) is a token; a noisy top-k gating network (`.gating`)
    sends it to `k` of `num_experts` feed-forward experts (`.experts`), and
    its output is the gate-weighted sum of theirs. The layer adds the
    balancing loss `loss_coef * (cv_squared(importance) + cv_squared(load))`
    with `add_loss`. More in docs/guide.md and docs/api.md; for users of the
    original `expert_utils.py`, docs/migration.md.

    Args:
        num_experts: int >= 1.
        k: int in `[1, num_experts]`, experts per token.
        output_dim: int, or None (default) for the input's size.
        hidden_sizes: tuple of ints, the experts' hidden layer sizes.
        hidden_activation: activation of the experts' hidden layers.
        autoscale: bool; multiply the matmul of each expert layer whose
            input size `m` is not the input's `d` by `(m / d) ** -0.5`.
        noisy_gating: bool, learned gating noise while training.
        noise_epsilon: float >= 0, added to the noise standard deviation.
        loss_coef: float >= 0, the weight of the balancing loss.
        gate_initializer: initializer of the gating kernels.
        expert_initializer: initializer of each expert's kernels.
        seed: optional int, the seed of the gating noise.
        cross_replica_balance: bool; under a `tf.distribute` strategy, sum
            importance and load over the replicas before the loss.
        routing_metrics: bool; track the loss and the balance as metrics
            `{name}_aux_loss`, ..., and update `last_importance`, `last_load`.
        dispatch: `"sparse"` (exact, no XLA) or `"capacity"` (fixed slots
            per expert, compiles with XLA, drops tokens past capacity).
        capacity_factor: float > 0; with `dispatch="capacity"`, training
            slots per expert: `ceil(capacity_factor * tokens * k /
            num_experts)`, within `[min_capacity, tokens]`.
        eval_capacity_factor: float > 0, the same in inference (from
            `num_experts / k` on, no token is dropped).
        min_capacity: int >= 1, the fewest slots per expert.
        expert_parallel: bool; with `dispatch="capacity"`, built under a
            `tf.distribute.MirroredStrategy` of R replicas, replica `r`
            holds only experts `[r * E / R, (r + 1) * E / R)` and runs them
            on the tokens of every replica (all-to-all); capacity counts per
            sending replica. Train with `keras_moe.ExpertParallelOptimizer`.
            See docs/distributed.md.
        **kwargs: base layer keyword arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: a float tensor `[..., d]` of rank >= 2.
        training: Python bool; gating noise only when true.
        mask: optional bool tensor `inputs.shape[:-1]` (Keras passes the
            mask of `inputs`); masked positions are not routed, output zeros
            and count in no statistic.
        gate_multiplier: optional float tensor `inputs.shape[:-1]`, finite
            and >= 0, multiplied into each token's gates.
        gating_inputs: optional float tensor `[..., d_gate]` with the same
            leading shape: the gate reads it, the experts read `inputs`.
        return_routing: bool; also return a dict of routing tensors.
        noise: optional float tensor `inputs.shape[:-1] + (num_experts,)`,
            the standard-normal gating draw to use instead of a fresh one.
        inputs_mask: where Keras passes the mask of `inputs` when other
            tensor arguments are given; used when `mask` is None.

    Input shape:
        `(..., d)`.

    Output shape:
        `(..., output_dim)`.

    Returns:
        The outputs; with `return_routing=True`, `(outputs, routing)`, where
        `routing` holds `gates`, `importance`, `load`, `aux_loss`,
        `part_sizes`, `expert_index`, `token_index` and `expert_gates` (and
        `dropped_fraction` with `dispatch="capacity"`): see docs/api.md.

    Example:

    >>> moe = MixtureOfExperts(num_experts=8, k=2, hidden_sizes=(32,))
    >>> y = moe(np.random.rand(4, 10, 16).astype("float32"))
    >>> y.shape
    TensorShape([4, 10, 16])
    >>> len(moe.losses)
    1
    """

    def __init__(
        self,
        num_experts,
        k=2,
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
        if dispatch not in ("sparse", "capacity"):
            raise ValueError(
                "`dispatch` must be 'sparse' or 'capacity'. "
                f"Received: dispatch={dispatch!r}"
            )
        self.dispatch = dispatch
        self.capacity_factor = validation.check_positive_float(
            "capacity_factor", capacity_factor
        )
        self.eval_capacity_factor = validation.check_positive_float(
            "eval_capacity_factor", eval_capacity_factor
        )
        self.min_capacity = validation.check_int("min_capacity", min_capacity, 1)
        expert_parallel = validation.check_bool(
            "expert_parallel", expert_parallel)
        if expert_parallel and dispatch != "capacity":
            raise ValueError(
                "`expert_parallel=True` needs `dispatch=\"capacity\"`: the "
                "all-to-all between replicas moves slabs of a static shape. "
                f"Received: dispatch={dispatch!r}"
            )
        # The capacity dispatch has static shapes and compiles with XLA;
        # the all-to-all between replicas does not (on CPU, XLA with a
        # strategy fails even without it).
        self.supports_jit = dispatch == "capacity" and not expert_parallel
        if self._drops_tokens() and self.routing_metrics:
            self._routing_trackers["dropped_fraction"] = keras.metrics.Mean(
                name=f"{self.name}_dropped_fraction"
            )
        self.gating = NoisyTopKGating(
            num_experts,
            k=k,
            noisy_gating=noisy_gating,
            noise_epsilon=noise_epsilon,
            kernel_initializer=gate_initializer,
            seed=seed,
            dtype=self.dtype_policy,
            name="gating",
        )
        self.experts = _experts(
            self, num_experts, output_dim, hidden_sizes, hidden_activation,
            autoscale, expert_initializer, expert_parallel=expert_parallel)

    @property
    def expert_parallel(self):
        return self.experts.expert_parallel

    def _drops_tokens(self):
        return self.dispatch == "capacity"

    def _noisy(self):
        return self.gating.noisy_gating

    @property
    def gating_input_dim(self):
        return self.gating.input_dim

    def _statistics_shape(self):
        return (self.num_experts,)

    def _noise_shapes(self):
        return [(self.num_experts,)]

    def _build_sublayers(self, input_dim, gating_dim):
        self.gating.build((None, gating_dim))
        self.experts.build((None, input_dim))

    def _route(self, x, gate_x, training, multiplier, noise, mask):
        gates, load = self.gating(
            gate_x, training=training, noise=noise, mask=mask
        )
        if multiplier is not None:
            gates *= tf.expand_dims(multiplier, 1)
        statistics = {"importance": tf.reduce_sum(gates, 0), "load": load}
        if self.dispatch == "capacity":
            dispatcher = CapacityDispatcher(
                self.num_experts, gates, self.gating.k,
                self._capacity(x, training),
            )
            expert_outputs = self.experts(
                tf.cast(dispatcher.dispatch(x), self.compute_dtype)
            )
            return Routed(
                outputs=dispatcher.combine(expert_outputs),
                statistics=statistics,
                part_sizes=dispatcher.part_sizes,
                pairs=dispatcher.routed_pairs,
                gates=lambda: gates,
                dropped_fraction=dispatcher.dropped_fraction,
            )
        xla.check_not_xla(
            'MixtureOfExperts with dispatch="sparse" (the default)',
            'dispatch="capacity" has static shapes and does.',
        )
        dispatcher = SparseDispatcher(self.num_experts, gates)
        expert_outputs = self.experts(
            tf.cast(dispatcher.dispatch_concatenated(x), self.compute_dtype),
            dispatcher.part_sizes,
        )
        return Routed(
            outputs=dispatcher.combine_concatenated(expert_outputs),
            statistics=statistics,
            part_sizes=dispatcher.part_sizes,
            pairs=lambda: (dispatcher.expert_index, dispatcher.batch_index,
                           dispatcher.nonzero_gates),
            gates=lambda: gates,
            dropped_fraction=None,
        )

    def _capacity(self, x, training):
        """Slots per expert: `capacity_factor * tokens * k / num_experts`
        rounded up, at least `min_capacity`, at most the token count (which
        can drop nothing). A Python int when the token count is static."""
        factor = self.capacity_factor if training else self.eval_capacity_factor
        share = factor * self.gating.k / self.num_experts
        num_tokens = x.shape[0]
        if num_tokens is not None and self.experts.num_shards == 1:
            return max(1, min(num_tokens, max(
                self.min_capacity, math.ceil(share * num_tokens))))
        num_tokens = tf.shape(x)[0]
        if self.experts.num_shards > 1:
            num_replicas, _ = all_to_all.replica_layout()
            if num_replicas > 1:
                # The slabs of every replica must have one shape: the
                # capacity of the replica with the most tokens (a ragged
                # last batch gives replicas different counts).
                # (tf.distribute reduces only by SUM and MEAN.)
                counts = tf.distribute.get_replica_context().all_gather(
                    tf.reshape(tf.cast(num_tokens, tf.float32), [1]), 0)
                num_tokens = tf.cast(tf.reduce_max(counts), tf.int32)
        wanted = tf.cast(
            tf.math.ceil(share * tf.cast(num_tokens, tf.float32)), tf.int32
        )
        return tf.maximum(
            1, tf.minimum(num_tokens, tf.maximum(self.min_capacity, wanted))
        )

    def _balance(self, statistics):
        return statistics["importance"], statistics["load"]

    def get_config(self):
        base_config = super().get_config()
        gating = self.gating
        config = {
            **self._shared_config(gating),
            "num_experts": gating.num_experts,
            "k": gating.k,
            "seed": gating.seed,
            "dispatch": self.dispatch,
            "capacity_factor": self.capacity_factor,
            "eval_capacity_factor": self.eval_capacity_factor,
            "min_capacity": self.min_capacity,
            "expert_parallel": self.expert_parallel,
        }
        return {**base_config, **config}
