"""The Sparsely-Gated Mixture-of-Experts layers: the original
`LocalMixtureOfExperts` and the hierarchical `DistributedMixtureOfExperts`
as Keras layers."""

import collections
import math

import keras
import tensorflow as tf

from keras_moe import (
    all_to_all, balance, private_hooks, validation, xla,
)
from keras_moe.dispatch import CapacityDispatcher, SparseDispatcher
from keras_moe.experts import FeedForwardExperts
from keras_moe.gating import NoisyTopKGating
from keras_moe.secondary_gating import SecondaryGating

# What routing one flat batch of tokens gives. `statistics` holds the
# batch sums that the balancing loss is made of (summed over replicas before
# `_balance` turns them into importance and load). Built only when asked
# for: `pairs()` gives `(expert_index, batch_index, expert_gates)`, each
# routed (token, expert) pair sorted by expert, then by token, and
# `gates()` the dense `[tokens, num_experts]` gates. `dropped_fraction` is
# None where nothing can be dropped.
Routed = collections.namedtuple(
    "Routed",
    ["outputs", "statistics", "part_sizes", "pairs", "gates",
     "dropped_fraction"],
)


def _experts(layer, num_experts, output_dim, hidden_sizes, hidden_activation,
             autoscale, expert_initializer, expert_parallel=False):
    """The `FeedForwardExperts` sublayer of an MoE layer, `layer.experts`."""
    return FeedForwardExperts(
        num_experts,
        output_dim,
        hidden_sizes=hidden_sizes,
        hidden_activation=hidden_activation,
        autoscale=autoscale,
        kernel_initializer=expert_initializer,
        expert_parallel=expert_parallel,
        dtype=layer.dtype_policy,
        name="experts",
    )


class _SparseMixtureBase(keras.layers.Layer):
    """What every sparse MoE layer shares: flattening inputs of any rank,
    masks, side-input checks, the balancing loss and the routing report.

    Subclasses make `self.experts` (a `FeedForwardExperts`, which gives
    `num_experts`, `input_dim` and `output_dim`) and define `_route` on one
    flat batch of tokens, `_balance`, `gating_input_dim` and
    `_noise_shapes`.
    """

    def __init__(
        self,
        loss_coef=1e-2,
        cross_replica_balance=True,
        routing_metrics=True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.loss_coef = validation.check_non_negative_float(
            "loss_coef", loss_coef
        )
        self.cross_replica_balance = validation.check_bool(
            "cross_replica_balance", cross_replica_balance
        )
        self.routing_metrics = validation.check_bool(
            "routing_metrics", routing_metrics
        )
        # Owned metrics reach `fit`/`evaluate` logs and TensorBoard through
        # `Model.metrics`, named after the layer.
        self._routing_trackers = {
            key: keras.metrics.Mean(name=f"{self.name}_{key}")
            for key in (
                ("aux_loss", "importance_cv2", "load_cv2", "max_overload")
                if self.routing_metrics else ()
            )
        }
        self.supports_masking = True
        self.supports_jit = False
        # Inputs are cast here, the experts' to the compute dtype and the
        # gate's to float32: Keras must not round them (or `noise`) to
        # float16 first. The experts autocast their own kernels.
        self.autocast = False

    # `add_loss` terms kept per replica thread under a strategy (see
    # `private_hooks.replica_thread_losses`).
    _losses = private_hooks.replica_thread_losses

    def __call__(self, inputs, *args, **kwargs):
        validation.check_known_rank("inputs", inputs)
        return super().__call__(inputs, *args, **kwargs)

    def load_own_variables(self, store):
        # Files written before `last_importance` and `last_load` existed
        # whatever `routing_metrics` hold none for a layer built with
        # `routing_metrics=False`: they keep their values (zeros).
        if len(store.keys()) == 0:
            return
        super().load_own_variables(store)

    @property
    def num_experts(self):
        return self.experts.num_experts

    @property
    def input_dim(self):
        return self.experts.layer_sizes[0]

    @property
    def output_dim(self):
        return self.experts.layer_sizes[-1]

    def _output_dim_for(self, input_dim):
        return self.experts.output_dim or input_dim

    def _shared_config(self, gating):
        """The config entries of the arguments every MoE layer takes;
        `gating` is the (first-level) gating network."""
        experts = self.experts
        return {
            "output_dim": experts.output_dim,
            "hidden_sizes": list(experts.hidden_sizes),
            "hidden_activation": keras.activations.serialize(
                experts.hidden_activation
            ),
            "autoscale": experts.autoscale,
            "noisy_gating": gating.noisy_gating,
            "noise_epsilon": gating.noise_epsilon,
            "loss_coef": self.loss_coef,
            "cross_replica_balance": self.cross_replica_balance,
            "routing_metrics": self.routing_metrics,
            "gate_initializer": keras.initializers.serialize(
                gating.kernel_initializer
            ),
            "expert_initializer": keras.initializers.serialize(
                experts.kernel_initializer
            ),
        }

    def _noise_shapes(self):
        """Trailing shapes of the noise draws, one per gating level."""
        raise NotImplementedError

    def _build_sublayers(self, input_dim, gating_dim):
        raise NotImplementedError

    def build(self, inputs_shape, gating_inputs_shape=None):
        validation.check_input_shape("inputs", inputs_shape, 2)
        input_dim = inputs_shape[-1]
        if gating_inputs_shape is None:
            gating_dim = input_dim
        else:
            validation.check_input_shape("gating_inputs", gating_inputs_shape, 2)
            gating_dim = gating_inputs_shape[-1]
        self._build_sublayers(input_dim, gating_dim)
        # The last training batch's per-expert statistics, for
        # callbacks (`keras_moe.callbacks`); global under tf.distribute,
        # so the first replica's copy is the one to keep. They exist
        # whatever `routing_metrics` (which only says whether they are
        # updated), so that weights move between the two settings.
        self.last_importance, self.last_load = (
            self.add_weight(
                name=name,
                shape=self._statistics_shape(),
                initializer="zeros",
                trainable=False,
                autocast=False,
                aggregation="only_first_replica",
            )
            for name in ("last_importance", "last_load")
        )

    def _route(self, x, gate_x, training, multiplier, noise, mask):
        """Routes flat tokens `x [tokens, d]`; returns a `Routed`.

        Tokens where the bool `mask [tokens]` (or None) is False must get
        zero gates, reach no expert and count in no statistic.
        """
        raise NotImplementedError

    def _balance(self, statistics):
        """`(importance, load)` from a `Routed.statistics` dict."""
        raise NotImplementedError

    def _global_statistics(self, statistics):
        """Sums the balancing statistics over replicas, differentiably.

        Under a `tf.distribute` strategy each replica sees part of the
        batch; the original summed importance and load over all its
        datashards before the CV^2 loss, and so do we, so the loss and its
        gradients are those of the global batch.
        """
        if not self.cross_replica_balance:
            return statistics
        context = tf.distribute.get_replica_context()
        if context is None or context.num_replicas_in_sync == 1:
            return statistics
        return context.all_reduce(tf.distribute.ReduceOp.SUM, statistics)

    def call(
        self,
        inputs,
        training=None,
        mask=None,
        gate_multiplier=None,
        gating_inputs=None,
        return_routing=False,
        noise=None,
        inputs_mask=None,
    ):
        if mask is None:
            # Keras fills `mask` from `inputs` only when `inputs` is the one
            # tensor argument; with others it fills `inputs_mask` instead.
            mask = inputs_mask
        inputs = validation.check_float_tensor("inputs", inputs)
        validation.check_input_shape(
            "inputs", inputs.shape, 2, None, self.input_dim
        )
        leading_shape = tf.shape(inputs)[:-1]
        x = tf.reshape(inputs, [-1, self.input_dim])
        gate_x = x
        if gating_inputs is not None:
            gating_inputs = validation.check_float_tensor(
                "gating_inputs", gating_inputs
            )
            validation.check_input_shape(
                "gating_inputs", gating_inputs.shape, 2, None,
                self.gating_input_dim,
            )
            gating_inputs = validation.check_leading_shape(
                "gating_inputs", gating_inputs, inputs, "inputs",
                (self.gating_input_dim,),
            )
            gate_x = tf.reshape(gating_inputs, [-1, self.gating_input_dim])
        multiplier = None
        if gate_multiplier is not None:
            gate_multiplier = validation.check_float_tensor(
                "gate_multiplier", gate_multiplier
            )
            gate_multiplier = validation.check_leading_shape(
                "gate_multiplier", gate_multiplier, inputs, "inputs"
            )
            multiplier = tf.reshape(tf.cast(gate_multiplier, tf.float32), [-1])
        if noise is not None:
            noise = self._flatten_noise(noise, inputs)
        token_mask = None
        if mask is not None:
            mask = validation.check_leading_shape(
                "mask", tf.cast(validation.to_tensor("mask", mask), tf.bool),
                inputs, "inputs",
            )
            token_mask = tf.reshape(mask, [-1])
            # Masked tokens are never read (padding may hold NaN): zeros keep
            # them out of the experts' gradients too. The gate zeroes their
            # gates, so they are not routed and count in no statistic.
            x = tf.where(tf.expand_dims(token_mask, 1), x, tf.zeros((), x.dtype))
            if multiplier is not None:
                multiplier = tf.where(token_mask, multiplier, 0.0)
        if multiplier is not None:
            multiplier = validation.check_finite_non_negative(
                "gate_multiplier", multiplier
            )
        if gating_inputs is not None:
            x = validation.check_finite("inputs", x)
        if noise is not None and len(noise) == 1:
            noise = noise[0]

        routed = self._route(x, gate_x, training, multiplier, noise, token_mask)
        # The tokens the statistics count (unmasked), summed over replicas
        # with them.
        if token_mask is None:
            num_tokens = tf.cast(tf.shape(x)[0], tf.float32)
        else:
            num_tokens = tf.reduce_sum(tf.cast(token_mask, tf.float32))
        statistics = self._global_statistics(
            dict(routed.statistics, num_tokens=num_tokens)
        )
        importance, load = self._balance(statistics)
        importance_cv2 = balance.cv_squared(importance)
        load_cv2 = balance.cv_squared(load)
        aux_loss = self.loss_coef * (importance_cv2 + load_cv2)
        self.add_loss(aux_loss)
        if self.routing_metrics:
            values = {
                "aux_loss": aux_loss,
                "importance_cv2": importance_cv2,
                "load_cv2": load_cv2,
                "max_overload": balance.max_overload(load),
                "dropped_fraction": routed.dropped_fraction,
            }
            # A batch with no tokens (no rows, or all masked) routes
            # nothing: its zeros must not count in the metrics' means, nor
            # replace the last statistics. `dropped_fraction` describes the
            # replica's own tokens.
            has_tokens = statistics["num_tokens"] > 0
            for key, tracker in self._routing_trackers.items():
                counts = num_tokens > 0 if key == "dropped_fraction" else (
                    has_tokens
                )
                tracker.update_state(
                    tf.where(counts, tf.stop_gradient(values[key]), 0.0),
                    sample_weight=tf.cast(counts, tf.float32),
                )
            if training:
                self.last_importance.assign(tf.where(
                    has_tokens, tf.stop_gradient(importance),
                    self.last_importance,
                ))
                self.last_load.assign(tf.where(
                    has_tokens, tf.stop_gradient(load), self.last_load
                ))

        flat_outputs = routed.outputs
        if xla.maybe_tracing_for_xla():
            # XLA drops the assertion ops that reject bad input: a token
            # with one gets NaN outputs instead of a finite wrong answer.
            used_noise = noise if training and self._noisy() else None
            # A finite token whose gate logits overflow has NaN gates.
            finite_gates = tf.reduce_all(tf.math.is_finite(routed.gates()), 1)
            flat_outputs = tf.where(
                (self._valid_tokens(
                    x, gate_x, multiplier, used_noise, token_mask
                ) & finite_gates)[:, None],
                flat_outputs,
                tf.constant(float("nan"), flat_outputs.dtype),
            )
        outputs = tf.reshape(
            flat_outputs, tf.concat([leading_shape, [self.output_dim]], 0)
        )
        outputs = tf.ensure_shape(
            outputs, inputs.shape[:-1].concatenate([self.output_dim])
        )
        if not return_routing:
            return outputs
        gates = tf.reshape(
            routed.gates(), tf.concat([leading_shape, [self.num_experts]], 0)
        )
        routing = {
            "gates": gates,
            "importance": importance,
            "load": load,
            "aux_loss": aux_loss,
            "part_sizes": routed.part_sizes,
        }
        (
            routing["expert_index"],
            batch_index,
            routing["expert_gates"],
        ) = routed.pairs()
        routing["token_index"] = tf.cast(batch_index, tf.int64)
        if routed.dropped_fraction is not None:
            routing["dropped_fraction"] = routed.dropped_fraction
        return outputs, routing

    def _noisy(self):
        """Whether the gating adds noise while training."""
        raise NotImplementedError

    def _valid_tokens(self, x, gate_x, multiplier, noise, token_mask):
        """bool `[tokens]`: which tokens pass the checks of `call` (finite
        inputs, gating inputs and noise, a finite multiplier >= 0); masked
        tokens always do."""
        per_token = [x, gate_x]
        if noise is not None:
            per_token += tf.nest.flatten(noise)
        valid = tf.reduce_all(
            [tf.reduce_all(tf.math.is_finite(tf.reshape(
                t, [tf.shape(t)[0], -1])), 1) for t in per_token],
            0,
        )
        if multiplier is not None:
            valid &= tf.math.is_finite(multiplier) & (multiplier >= 0)
        if token_mask is not None:
            valid |= ~token_mask
        return valid

    def _flatten_noise(self, noise, inputs):
        shapes = self._noise_shapes()
        names = ["noise"] if len(shapes) == 1 else [
            f"noise[{i}]" for i in range(len(shapes))
        ]
        if len(shapes) == 1:
            draws = [noise]
        elif isinstance(noise, (list, tuple)) and len(noise) == len(shapes):
            draws = list(noise)
        else:
            raise ValueError(
                f"`noise` must be a tuple of {len(shapes)} tensors with "
                f"trailing shapes {shapes}. Received: noise={noise!r}"
            )
        flat = []
        for name, draw, shape in zip(names, draws, shapes):
            draw = validation.check_float_tensor(name, draw)
            draw = validation.check_leading_shape(
                name, draw, inputs, "inputs", shape
            )
            flat.append(tf.reshape(draw, (-1,) + tuple(shape)))
        return flat

    def compute_output_shape(self, inputs_shape, gating_inputs_shape=None):
        return tuple(inputs_shape[:-1]) + (
            self._output_dim_for(inputs_shape[-1]),
        )

    def compute_output_spec(
        self,
        inputs,
        training=None,
        mask=None,
        gate_multiplier=None,
        gating_inputs=None,
        return_routing=False,
        noise=None,
        inputs_mask=None,
    ):
        outputs = keras.KerasTensor(
            self.compute_output_shape(inputs.shape), dtype=self.compute_dtype
        )
        if not return_routing:
            return outputs
        n = self.num_experts
        statistics_shape = self._statistics_shape()
        routing = {
            "gates": keras.KerasTensor(
                tuple(inputs.shape[:-1]) + (n,), dtype="float32"
            ),
            "importance": keras.KerasTensor(statistics_shape, dtype="float32"),
            "load": keras.KerasTensor(statistics_shape, dtype="float32"),
            "aux_loss": keras.KerasTensor((), dtype="float32"),
            "part_sizes": keras.KerasTensor((n,), dtype="int32"),
            "expert_index": keras.KerasTensor((None,), dtype="int32"),
            "token_index": keras.KerasTensor((None,), dtype="int64"),
            "expert_gates": keras.KerasTensor((None,), dtype="float32"),
        }
        if self._drops_tokens():
            routing["dropped_fraction"] = keras.KerasTensor((), dtype="float32")
        return outputs, routing

    def _drops_tokens(self):
        """Whether routing can drop tokens (and reports
        `dropped_fraction`)."""
        return False

    def compute_mask(self, inputs, mask=None):
        return mask


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
