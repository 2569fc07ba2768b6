"""What every sparse Mixture-of-Experts layer shares: flattening inputs of
any rank, masks, side-input checks, the balancing loss, the routing report
and the metrics; the flat and hierarchical layers define the routing."""

import collections

import keras
import tensorflow as tf

from keras_moe import balance, private_hooks, validation, xla
from keras_moe.experts import FeedForwardExperts

# What routing one flat batch of tokens gives. `statistics` holds the
# batch sums that the balancing loss is made of (summed over replicas before
# `_balance` turns them into importance and load). Built only when asked
# for: `pairs()` gives `(expert_index, batch_index, expert_gates)`, each
# routed (token, expert) pair sorted by expert, then by token, and
# `gates()` the dense `[tokens, num_experts]` gates. `dropped_fraction` is
# None where nothing can be dropped.
#: The values of `balance_loss`.
BALANCE_LOSSES = ("cv_squared", "switch", None)

Routed = collections.namedtuple(
    "Routed",
    ["outputs", "statistics", "part_sizes", "pairs", "gates",
     "dropped_fraction"],
)


def _experts(layer, num_experts, output_dim, hidden_sizes, hidden_activation,
             autoscale, expert_initializer, expert_parallel=False, glu=False):
    """The `FeedForwardExperts` sublayer of an MoE layer, `layer.experts`."""
    return FeedForwardExperts(
        num_experts,
        output_dim,
        hidden_sizes=hidden_sizes,
        hidden_activation=hidden_activation,
        autoscale=autoscale,
        kernel_initializer=expert_initializer,
        expert_parallel=expert_parallel,
        glu=glu,
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
        balance_loss="cv_squared",
        router_z_loss_coef=0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.loss_coef = validation.check_non_negative_float(
            "loss_coef", loss_coef
        )
        if balance_loss not in BALANCE_LOSSES:
            raise ValueError(
                f"`balance_loss` must be one of {list(BALANCE_LOSSES)}. "
                f"Received: balance_loss={balance_loss!r}"
            )
        self.balance_loss = balance_loss
        self.router_z_loss_coef = validation.check_non_negative_float(
            "router_z_loss_coef", router_z_loss_coef
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
            for key in (self._metric_keys() if self.routing_metrics else ())
        }
        self.supports_masking = True
        self.supports_jit = False
        # Inputs are cast here, the experts' to the compute dtype and the
        # gate's to float32: Keras must not round them (or `noise`) to
        # float16 first. The experts autocast their own kernels.
        self.autocast = False

    def _metric_keys(self):
        """The routing metrics the balancing losses give, in log order."""
        balance_keys = {
            "cv_squared": ("importance_cv2", "load_cv2"),
            "switch": ("switch_loss", "load_cv2"),
            None: ("load_cv2",),
        }[self.balance_loss]
        return (("aux_loss",) + balance_keys + ("max_overload",)
                + (("z_loss",) if self.router_z_loss_coef > 0 else ()))

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

    def _init_dispatch(self, dispatch, capacity_factor, eval_capacity_factor,
                       min_capacity, expert_parallel):
        """Checks and keeps the dispatch arguments of the layers (`dispatch`,
        the capacity's, `expert_parallel`); returns `expert_parallel`
        checked."""
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
        return expert_parallel

    def _dispatch_config(self):
        return {
            "dispatch": self.dispatch,
            "capacity_factor": self.capacity_factor,
            "eval_capacity_factor": self.eval_capacity_factor,
            "min_capacity": self.min_capacity,
            "expert_parallel": self.expert_parallel,
        }

    def _output_dim_for(self, input_dim):
        return self.experts.output_dim or input_dim

    def _shared_config(self, gating=None):
        """The config entries of the arguments every MoE layer takes;
        `gating` is the (first-level) gating network, a `NoisyTopKGating`
        (None: the caller gives `noisy_gating`, `noise_epsilon` and
        `gate_initializer` itself)."""
        experts = self.experts
        config = {
            "output_dim": experts.output_dim,
            "hidden_sizes": list(experts.hidden_sizes),
            "hidden_activation": keras.activations.serialize(
                experts.hidden_activation
            ),
            "autoscale": experts.autoscale,
            "loss_coef": self.loss_coef,
            "cross_replica_balance": self.cross_replica_balance,
            "routing_metrics": self.routing_metrics,
            "expert_initializer": keras.initializers.serialize(
                experts.kernel_initializer
            ),
        }
        if gating is not None:
            config.update(
                noisy_gating=gating.noisy_gating,
                noise_epsilon=gating.noise_epsilon,
                gate_initializer=keras.initializers.serialize(
                    gating.kernel_initializer
                ),
            )
        return config

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
        values = self._loss_terms(statistics, importance, load)
        aux_loss = values["aux_loss"]
        self.add_loss(aux_loss)
        if training:
            self._after_training_call(statistics)
        if self.routing_metrics:
            values.update(
                max_overload=balance.max_overload(load),
                dropped_fraction=routed.dropped_fraction,
                **self._state_metric_values(),
            )
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

    def _loss_terms(self, statistics, importance, load):
        """The auxiliary loss (`aux_loss`) and its terms, from the global
        statistics: the balancing loss `balance_loss` weighted by
        `loss_coef`, plus the router z-loss weighted by
        `router_z_loss_coef`.

        `"switch"` reads `statistics["counts"]` (the routed pairs per
        expert) and `statistics["probability_sum"]` (the router
        probabilities summed over tokens), and the z-loss
        `statistics["z_loss_sum"]` (`logsumexp(logits)^2` summed over
        tokens), which `_route` then provides.
        """
        terms = {"load_cv2": balance.cv_squared(load)}
        num_tokens = tf.maximum(statistics["num_tokens"], 1.0)
        if self.balance_loss == "cv_squared":
            terms["importance_cv2"] = balance.cv_squared(importance)
            balance_value = terms["importance_cv2"] + terms["load_cv2"]
        elif self.balance_loss == "switch":
            terms["switch_loss"] = balance.switch_loss(
                statistics["counts"],
                statistics["probability_sum"] / num_tokens,
            )
            balance_value = terms["switch_loss"]
        else:
            balance_value = tf.zeros((), tf.float32)
        aux_loss = self.loss_coef * balance_value
        if self.router_z_loss_coef > 0:
            terms["z_loss"] = statistics["z_loss_sum"] / num_tokens
            aux_loss += self.router_z_loss_coef * terms["z_loss"]
        terms["aux_loss"] = aux_loss
        return terms

    def _after_training_call(self, statistics):
        """What the routing updates after a training call, from the global
        statistics (the self-balancing routers' state)."""

    def _state_metric_values(self):
        """Scalar metrics of the routing's own state, by metric key."""
        return {}

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
