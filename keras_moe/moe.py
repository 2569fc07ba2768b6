"""The Sparsely-Gated Mixture-of-Experts layer: the original
`LocalMixtureOfExperts` as a Keras layer, composed of a router, a
dispatcher and experts."""

import keras
import tensorflow as tf

from keras_moe import initialization, routers, validation, xla
from keras_moe.capacity import slots_per_expert
from keras_moe.dispatch import CapacityDispatcher, SparseDispatcher
from keras_moe.expert_choice import ExpertChoiceDispatcher
from keras_moe.experts import FeedForwardExperts
from keras_moe.gating import NoisyTopKGating, scatter_rows
from keras_moe.sparse_mixture import Routed, _experts, _SparseMixtureBase

#: The routers `MixtureOfExperts(router=...)` makes by name.
ROUTERS = ("noisy_top_k", "softmax_top_k", "switch", "sigmoid_top_k",
           "expert_choice")

# The gating arguments' defaults: a router they mean nothing to (or a
# Router instance, which holds its own) takes them only at these values.
_GATING_DEFAULTS = {
    "noisy_gating": True,
    "noise_epsilon": 1e-2,
    "normalize_top_k": True,
    "router_jitter": 0.0,
    "seed": None,
}


@keras.saving.register_keras_serializable(package="keras_moe")
class MixtureOfExperts(_SparseMixtureBase):
    """Sparsely-Gated Mixture-of-Experts layer.

    From Shazeer et al. (2017), "Outrageously Large Neural Networks: The
    Sparsely-Gated Mixture-of-Experts Layer"
    (https://arxiv.org/abs/1701.06538). Every position of the input (all
    axes but the last) is a token; a router (`.gating`) sends it to `k` of
    `num_experts` feed-forward experts (`.experts`), and its output is the
    gate-weighted sum of theirs. The default router is the paper's noisy
    top-k gating; `router` chooses today's (docs/routers.md): a softmax
    top-k (Mixtral, Qwen-MoE), Switch's top-1, DeepSeek-V3's sigmoid top-k
    with loss-free balancing, or expert choice (Zhou et al. 2022). The
    layer adds one auxiliary loss with `add_loss`: the balancing loss
    (`balance_loss`) weighted by `loss_coef`, plus the router z-loss
    weighted by `router_z_loss_coef`. An optional shared expert
    (Qwen-MoE, DeepSeek-MoE) reads every token. More in docs/guide.md and
    docs/api.md; for users of the original `expert_utils.py`,
    docs/migration.md.

    Args:
        num_experts: int >= 1.
        k: int in `[1, num_experts]`, experts per token (1 with
            `router="switch"`; with `"expert_choice"`, the average).
        output_dim: int, or None (default) for the input's size.
        hidden_sizes: tuple of ints, the experts' hidden layer sizes.
        hidden_activation: activation of the experts' hidden layers.
        autoscale: bool; multiply the matmul of each expert layer whose
            input size `m` is not the input's `d` by `(m / d) ** -0.5`.
        noisy_gating: bool, learned gating noise while training
            (`router="noisy_top_k"` only).
        noise_epsilon: float >= 0, added to the noise standard deviation
            (`router="noisy_top_k"` only).
        loss_coef: float >= 0, the weight of the balancing loss.
        gate_initializer: initializer of the router's kernels.
        expert_initializer: initializer of each expert's kernels.
        seed: optional int, the seed of the gating noise (or jitter).
        cross_replica_balance: bool; under a `tf.distribute` strategy, sum
            the routing statistics over the replicas before the losses.
        routing_metrics: bool; track the losses and the balance as metrics
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
        router: `"noisy_top_k"` (the default, the paper's), `"softmax_top_k"`,
            `"switch"`, `"sigmoid_top_k"`, `"expert_choice"` (with
            `dispatch="capacity"` only), or a `keras_moe.routers.Router`
            layer (with the layer's `num_experts` and `k`; the gating
            arguments above are then the router's own).
        normalize_top_k: bool; renormalize the top-k gates to sum to 1
            (`"softmax_top_k"`, `"sigmoid_top_k"`; the other routers define
            their gates, and take only the default).
        balance_loss: `"cv_squared"` (the paper's `cv_squared(importance) +
            cv_squared(load)`), `"switch"` (`E * sum_i f_i * P_i`, Fedus et
            al. 2021), None (no balancing loss), or `"auto"`: `"cv_squared"`
            for `"noisy_top_k"`, None for `"expert_choice"` (balanced by
            construction), `"switch"` for the others.
        router_z_loss_coef: float >= 0, the weight of the router z-loss
            (ST-MoE, Zoph et al. 2022): the mean over tokens of
            `logsumexp(logits)^2`.
        router_jitter: float in `[0, 1)`; while training, the router's
            input is multiplied by uniform(1 - router_jitter,
            1 + router_jitter) noise (Switch, Mixtral). Not with
            `"noisy_top_k"`, which has its own noise.
        shared_expert_hidden_sizes: None (no shared expert) or a tuple of
            ints: an always-on feed-forward expert with these hidden sizes
            (the experts' activation), added to the routed output
            (Qwen-MoE, DeepSeek-MoE).
        shared_expert_gate: bool; scale the shared expert's output by
            `sigmoid(x @ shared_expert_gate_kernel)`, a `[d, 1]` kernel
            (Qwen-MoE).
        glu: bool; every hidden layer of the experts (and of the shared
            expert) is a gated linear unit, `activation(x @ W_gate) * (x @
            W_up)` (SwiGLU with `"silu"`: Mixtral, Qwen); see
            `FeedForwardExperts`.
        **kwargs: base layer keyword arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: a float tensor `[..., d]` of rank >= 2.
        training: Python bool; gating noise (or jitter) only when true.
        mask: optional bool tensor `inputs.shape[:-1]` (Keras passes the
            mask of `inputs`); masked positions are not routed, output zeros
            and count in no statistic.
        gate_multiplier: optional float tensor `inputs.shape[:-1]`, finite
            and >= 0, multiplied into each token's gates (not into the
            shared expert's output).
        gating_inputs: optional float tensor `[..., d_gate]` with the same
            leading shape: the router reads it, the experts read `inputs`.
        return_routing: bool; also return a dict of routing tensors.
        noise: optional float tensor `inputs.shape[:-1] + (num_experts,)`,
            the standard-normal gating draw to use instead of a fresh one
            (`router="noisy_top_k"` only).
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
    >>> mixtral_like = MixtureOfExperts(8, k=2, router="softmax_top_k",
    ...                                 shared_expert_hidden_sizes=(32,))
    >>> mixtral_like(np.random.rand(4, 10, 16).astype("float32")).shape
    TensorShape([4, 10, 16])
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
        router="noisy_top_k",
        normalize_top_k=True,
        balance_loss="auto",
        router_z_loss_coef=0.0,
        router_jitter=0.0,
        shared_expert_hidden_sizes=None,
        shared_expert_gate=False,
        glu=False,
        **kwargs,
    ):
        router = _router_argument(router)
        if balance_loss == "auto":
            balance_loss = _default_balance_loss(router)
        super().__init__(
            loss_coef=loss_coef,
            cross_replica_balance=cross_replica_balance,
            routing_metrics=routing_metrics,
            balance_loss=balance_loss,
            router_z_loss_coef=router_z_loss_coef,
            **kwargs,
        )
        expert_parallel = self._init_dispatch(
            dispatch, capacity_factor, eval_capacity_factor, min_capacity,
            expert_parallel)
        # The capacity dispatch has static shapes and compiles with XLA;
        # the all-to-all between replicas does not (on CPU, XLA with a
        # strategy fails even without it).
        self.supports_jit = dispatch == "capacity" and not expert_parallel
        gating_arguments = {
            "noisy_gating": validation.check_bool("noisy_gating", noisy_gating),
            "noise_epsilon": validation.check_non_negative_float(
                "noise_epsilon", noise_epsilon),
            "normalize_top_k": validation.check_bool(
                "normalize_top_k", normalize_top_k),
            "router_jitter": validation.check_non_negative_float(
                "router_jitter", router_jitter),
            "seed": seed,
        }
        if seed is not None:
            validation.check_int("seed", seed, 0)
        self._gate_initializer = keras.initializers.get(gate_initializer)
        if isinstance(router, str):
            self.router = router
            self.gating = _make_router(
                router, num_experts, k, dispatch, self._gate_initializer,
                self.dtype_policy, **gating_arguments)
        else:
            self.router = None
            _check_router_instance(router, num_experts, k,
                                   self._gate_initializer, gating_arguments)
            self.gating = router
        if self.gating.expert_choice and dispatch != "capacity":
            raise ValueError(
                "An expert-choice router fills a fixed number of slots per "
                "expert: it needs `dispatch=\"capacity\"`. Received: "
                f"dispatch={dispatch!r}"
            )
        self._gating_arguments = gating_arguments
        self.shared_expert_gate = validation.check_bool(
            "shared_expert_gate", shared_expert_gate)
        if shared_expert_hidden_sizes is None:
            if self.shared_expert_gate:
                raise ValueError(
                    "`shared_expert_gate=True` gates the shared expert, but "
                    "there is none: give `shared_expert_hidden_sizes`. "
                    "Received: shared_expert_hidden_sizes=None"
                )
            self.shared_expert = None
        else:
            shared_sizes = validation.check_sizes(
                "shared_expert_hidden_sizes", shared_expert_hidden_sizes)
            if glu is True and not shared_sizes:
                raise ValueError(
                    "`glu=True` gates the hidden layers of the shared expert "
                    "too, and `shared_expert_hidden_sizes` has none: give at "
                    "least one hidden size. Received: glu=True, "
                    f"shared_expert_hidden_sizes={shared_expert_hidden_sizes!r}"
                )
            self.shared_expert = FeedForwardExperts(
                1,
                output_dim,
                hidden_sizes=shared_sizes,
                hidden_activation=hidden_activation,
                autoscale=autoscale,
                glu=glu,
                # Not the draws of the routed experts' kernels, which take
                # the seeds offset by 0 .. num_experts * layers - 1.
                kernel_initializer=initialization.reseeded(
                    keras.initializers.get(expert_initializer),
                    num_experts * (len(validation.check_sizes(
                        "hidden_sizes", hidden_sizes)) + 1)),
                dtype=self.dtype_policy,
                name="shared_expert",
            )
        if self.routing_metrics:
            for key in (("dropped_fraction",) if self._drops_tokens() else ()
                        ) + tuple(self.gating.metric_names):
                self._routing_trackers[key] = keras.metrics.Mean(
                    name=f"{self.name}_{key}"
                )
        self.experts = _experts(
            self, num_experts, output_dim, hidden_sizes, hidden_activation,
            autoscale, expert_initializer, expert_parallel=expert_parallel,
            glu=glu)

    @property
    def expert_parallel(self):
        return self.experts.expert_parallel

    @property
    def k(self):
        return self.gating.k

    def _drops_tokens(self):
        return self.dispatch == "capacity"

    def _noisy(self):
        return isinstance(self.gating, NoisyTopKGating) and (
            self.gating.noisy_gating)

    @property
    def gating_input_dim(self):
        return self.gating.input_dim

    def _statistics_shape(self):
        return (self.num_experts,)

    def _noise_shapes(self):
        return [(self.num_experts,)]

    def _flatten_noise(self, noise, inputs):
        if not isinstance(self.gating, NoisyTopKGating):
            raise ValueError(
                "`noise` is the draw of the noisy top-k gating; the router "
                f"{type(self.gating).__name__} takes none. Received: noise "
                f"of shape {tuple(getattr(noise, 'shape', ()))}"
            )
        return super()._flatten_noise(noise, inputs)

    def _build_sublayers(self, input_dim, gating_dim):
        if not self.gating.built:
            self.gating.build((None, gating_dim))
        self.experts.build((None, input_dim))
        if self.shared_expert is not None:
            self.shared_expert.build((None, input_dim))
            if self.shared_expert_gate:
                self.shared_expert_gate_kernel = self.add_weight(
                    name="shared_expert_gate_kernel",
                    shape=(input_dim, 1),
                    initializer=initialization.reseeded(
                        self._gate_initializer, 2),
                    autocast=False,
                )

    def _route(self, x, gate_x, training, multiplier, noise, mask):
        capacity = (self._capacity(x, training)
                    if self.dispatch == "capacity" else None)
        routing = self.gating.route(
            gate_x, training=training, noise=noise, mask=mask,
            capacity=capacity if self.gating.expert_choice else None,
        )
        routing = self._checked_routing(routing, tf.shape(x)[0])
        if self.gating.expert_choice:
            routed = self._route_by_expert_choice(
                x, routing, multiplier, mask)
        else:
            routed = self._route_by_token_choice(
                x, routing, multiplier, mask, capacity)
        if self.shared_expert is None:
            return routed
        return routed._replace(
            outputs=routed.outputs + self._shared_outputs(x, mask))

    def _checked_routing(self, routing, num_tokens):
        """The router's routing dict, its entries' presence, dtypes and
        static shapes checked (a user's `Router` may return anything)."""
        gating = self.gating
        name = type(gating).__name__
        if gating.expert_choice:
            keys = routers.EXPERT_CHOICE_KEYS
            shapes = {"token_index": (self.num_experts, None),
                      "token_gates": (self.num_experts, None)}
        else:
            keys = routers.TOKEN_CHOICE_KEYS
            shapes = {"expert_index": (None, gating.k),
                      "expert_gates": (None, gating.k)}
        shapes["probabilities"] = (None, self.num_experts)
        shapes["logits"] = (None, self.num_experts)
        shapes["load"] = (self.num_experts,)
        if not isinstance(routing, dict) or not all(
                routing.get(key) is not None for key in keys):
            found = (sorted(routing) if isinstance(routing, dict)
                     else type(routing).__name__)
            raise ValueError(
                f"The router {name} must return a dict with {list(keys)} "
                "(see keras_moe.routers.Router). Received: "
                f"{found}"
            )
        checked = {}
        for key, value in routing.items():
            if value is None or key not in shapes:
                continue
            value = validation.to_tensor(f"routing[{key!r}]", value)
            integer = key.endswith("_index")
            if value.dtype.is_integer != integer or (
                    not integer and not value.dtype.is_floating):
                raise TypeError(
                    f"The router {name} returned `{key}` of dtype "
                    f"{value.dtype.name}; it must be "
                    f"{'an integer' if integer else 'a float'} tensor."
                )
            if not value.shape.is_compatible_with(shapes[key]):
                raise ValueError(
                    f"The router {name} returned `{key}` of shape "
                    f"{value.shape}; it must be {shapes[key]} (None: any)."
                )
            checked[key] = value
        return checked

    def _shared_outputs(self, x, mask):
        """The shared expert on every token (zero for masked ones), scaled
        by its sigmoid gate if it has one."""
        outputs = self.shared_expert(
            tf.cast(x, self.compute_dtype)[None])[0]
        if self.shared_expert_gate:
            # Gates in float32, as the router's.
            gate = tf.nn.sigmoid(tf.matmul(
                tf.cast(x, tf.float32),
                tf.cast(self.shared_expert_gate_kernel, tf.float32)))
            outputs *= tf.cast(gate, outputs.dtype)
        if mask is not None:
            outputs = tf.where(mask[:, None], outputs,
                               tf.zeros((), outputs.dtype))
        return outputs

    def _statistics(self, routing, gates, counts, mask):
        """The batch sums the losses read (summed over replicas later)."""
        statistics = {
            "importance": tf.reduce_sum(gates, 0),
            "load": (counts if routing.get("load") is None
                     else tf.cast(routing["load"], tf.float32)),
            "counts": tf.stop_gradient(counts),
        }
        if self.balance_loss == "switch":
            statistics["probability_sum"] = tf.reduce_sum(
                _masked(tf.cast(routing["probabilities"], tf.float32), mask),
                0)
        if self.router_z_loss_coef > 0:
            if routing.get("logits") is None:
                raise ValueError(
                    "`router_z_loss_coef` needs the router's logits, but "
                    f"{type(self.gating).__name__} returned none. Received: "
                    f"router_z_loss_coef={self.router_z_loss_coef}"
                )
            log_partition = tf.reduce_logsumexp(
                tf.cast(routing["logits"], tf.float32), 1)
            statistics["z_loss_sum"] = tf.reduce_sum(
                _masked(tf.square(log_partition), mask))
        return statistics

    def _route_by_token_choice(self, x, routing, multiplier, mask, capacity):
        expert_index = tf.cast(routing["expert_index"], tf.int32)
        expert_gates = tf.cast(routing["expert_gates"], tf.float32)
        # The dispatchers read the choice as dense gates: exactly the
        # chosen experts of each token are non-zero (top-k is not redone).
        gates = _masked(
            scatter_rows(expert_gates, expert_index, self.num_experts), mask)
        if multiplier is not None:
            gates *= tf.expand_dims(multiplier, 1)
        chosen = tf.ones_like(expert_gates)
        counts = tf.math.unsorted_segment_sum(
            tf.reshape(_masked(chosen, mask), [-1]),
            tf.reshape(expert_index, [-1]), self.num_experts)
        statistics = self._statistics(routing, gates, counts, mask)
        if self.dispatch == "capacity":
            dispatcher = CapacityDispatcher(
                self.num_experts, gates, self.gating.k, capacity,
                expert_index=expert_index,
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

    def _route_by_expert_choice(self, x, routing, multiplier, mask):
        num_tokens = tf.shape(x)[0]
        token_gates = tf.cast(routing["token_gates"], tf.float32)
        token_index = tf.cast(routing["token_index"], tf.int32)
        if multiplier is not None:
            # Empty slots read the appended zero.
            token_gates *= tf.gather(tf.pad(multiplier, [[0, 1]]),
                                     token_index)
        dispatcher = ExpertChoiceDispatcher(
            self.num_experts, token_index, token_gates, num_tokens)
        gates = dispatcher.gates()
        counts = tf.cast(dispatcher.part_sizes, tf.float32)
        statistics = self._statistics(routing, gates, counts, mask)
        expert_outputs = self.experts(
            tf.cast(dispatcher.dispatch(x), self.compute_dtype))
        # The share of (unmasked) tokens no expert took.
        valid = (tf.ones([num_tokens], tf.bool) if mask is None else mask)
        dropped = tf.reduce_sum(tf.cast(valid & ~dispatcher.taken(),
                                        tf.float32))
        return Routed(
            outputs=dispatcher.combine(expert_outputs),
            statistics=statistics,
            part_sizes=dispatcher.part_sizes,
            pairs=dispatcher.routed_pairs,
            gates=lambda: gates,
            dropped_fraction=dropped / tf.maximum(
                tf.reduce_sum(tf.cast(valid, tf.float32)), 1.0),
        )

    def _after_training_call(self, statistics):
        self.gating.update(statistics)

    def _state_metric_values(self):
        return self.gating.metric_values()

    def _capacity(self, x, training):
        """Slots per expert: `capacity_factor * tokens * k / num_experts`
        rounded up, at least `min_capacity`, at most the token count (which
        can drop nothing); with sharded experts, the same on every replica
        (their all-to-all moves slabs of one shape). A Python int when the
        token count is static."""
        factor = self.capacity_factor if training else self.eval_capacity_factor
        return slots_per_expert(
            x, factor, self.gating.k, self.num_experts, self.min_capacity,
            same_on_every_replica=self.experts.num_shards > 1)

    def _balance(self, statistics):
        return statistics["importance"], statistics["load"]

    def get_config(self):
        base_config = super().get_config()
        gating = self.gating
        arguments = self._gating_arguments
        config = {
            **self._shared_config(),
            "noisy_gating": arguments["noisy_gating"],
            "noise_epsilon": arguments["noise_epsilon"],
            "gate_initializer": keras.initializers.serialize(
                self._gate_initializer
            ),
            "num_experts": self.num_experts,
            "k": gating.k,
            "seed": arguments["seed"],
            **self._dispatch_config(),
            "router": (self.router if self.router is not None
                       else keras.saving.serialize_keras_object(gating)),
            "normalize_top_k": arguments["normalize_top_k"],
            "balance_loss": self.balance_loss,
            "router_z_loss_coef": self.router_z_loss_coef,
            "router_jitter": arguments["router_jitter"],
            "shared_expert_hidden_sizes": (
                None if self.shared_expert is None
                else list(self.shared_expert.hidden_sizes)),
            "shared_expert_gate": self.shared_expert_gate,
            "glu": self.experts.glu,
        }
        return {**base_config, **config}


def _masked(values, mask):
    """`values [tokens, ...]` with the rows of masked tokens zero."""
    if mask is None:
        return values
    mask = tf.reshape(mask, [-1] + [1] * (values.shape.rank - 1))
    return tf.where(mask, values, tf.zeros((), values.dtype))


def _router_argument(router):
    """`router` checked: a name of `ROUTERS` or a `Router` (a config dict,
    from `get_config`, deserialized)."""
    if isinstance(router, dict):
        router = keras.saving.deserialize_keras_object(router)
    if isinstance(router, str):
        if router not in ROUTERS:
            raise ValueError(
                f"`router` must be one of {list(ROUTERS)} or a "
                f"keras_moe.routers.Router layer. Received: router={router!r}"
            )
        return router
    if not isinstance(router, routers.Router):
        raise TypeError(
            f"`router` must be one of {list(ROUTERS)} or a "
            "keras_moe.routers.Router layer. Received: "
            f"router={router!r} (of type {type(router).__name__})"
        )
    return router


def _default_balance_loss(router):
    """`balance_loss="auto"`: the paper's CV^2 for its noisy top-k gating,
    none for expert choice (each expert fills its slots: the load is
    balanced by construction), the Switch loss for the others."""
    if router == "noisy_top_k" or isinstance(router, NoisyTopKGating):
        return "cv_squared"
    if router == "expert_choice" or getattr(router, "expert_choice", False):
        return None
    return "switch"


def _check_gating_defaults(names, why, arguments):
    """Raises for any of the gating arguments `names` that is not at its
    default: `why` says why it means nothing here."""
    for name in names:
        if arguments[name] != _GATING_DEFAULTS[name]:
            raise ValueError(
                f"`{name}` {why}. Received: {name}={arguments[name]!r}"
            )


def _make_router(name, num_experts, k, dispatch, gate_initializer,
                 dtype_policy, noisy_gating, noise_epsilon, normalize_top_k,
                 router_jitter, seed):
    """The router `name` of `ROUTERS`, named "gating"."""
    arguments = {
        "noisy_gating": noisy_gating, "noise_epsilon": noise_epsilon,
        "normalize_top_k": normalize_top_k, "router_jitter": router_jitter,
    }
    common = {"kernel_initializer": gate_initializer, "seed": seed,
              "dtype": dtype_policy, "name": "gating"}
    if name != "noisy_top_k":
        _check_gating_defaults(
            ("noisy_gating", "noise_epsilon"),
            f"applies to router='noisy_top_k' only, not router={name!r}",
            arguments)
    if name in ("noisy_top_k", "switch", "expert_choice"):
        _check_gating_defaults(
            ("normalize_top_k",),
            "applies to router='softmax_top_k' and 'sigmoid_top_k' only: "
            f"router={name!r} defines its gates",
            arguments)
    if name == "noisy_top_k":
        _check_gating_defaults(
            ("router_jitter",),
            "applies to the routers other than 'noisy_top_k', which adds "
            "its own learned noise",
            arguments)
        return NoisyTopKGating(num_experts, k=k, noisy_gating=noisy_gating,
                               noise_epsilon=noise_epsilon, **common)
    if name == "softmax_top_k":
        return routers.SoftmaxTopKRouter(
            num_experts, k=k, normalize_top_k=normalize_top_k,
            jitter=router_jitter, **common)
    if name == "switch":
        if k != 1:
            raise ValueError(
                "router='switch' sends each token to one expert (Fedus et "
                f"al. 2021): pass k=1. Received: k={k!r}"
            )
        return routers.SoftmaxTopKRouter(
            num_experts, k=1, normalize_top_k=False, jitter=router_jitter,
            **common)
    if name == "sigmoid_top_k":
        return routers.SigmoidTopKRouter(
            num_experts, k=k, normalize_top_k=normalize_top_k,
            jitter=router_jitter, **common)
    return routers.ExpertChoiceRouter(
        num_experts, k=k, jitter=router_jitter, **common)


def _check_router_instance(router, num_experts, k, gate_initializer,
                           arguments):
    """A `Router` given to `MixtureOfExperts` agrees with its arguments,
    and those that configure the built-in routers keep their defaults."""
    if router.num_experts != num_experts:
        raise ValueError(
            "`router` must route to the layer's `num_experts` "
            f"({num_experts}). Received: router.num_experts="
            f"{router.num_experts}"
        )
    if k != router.k:
        raise ValueError(
            f"`k` must be the router's k ({router.k}) when `router` is a "
            f"Router layer. Received: k={k!r}"
        )
    why = ("configures the built-in routers; a Router layer given as "
           "`router` holds its own configuration")
    _check_gating_defaults(
        ("noisy_gating", "noise_epsilon", "normalize_top_k",
         "router_jitter", "seed"), why, arguments)
    if not isinstance(gate_initializer, keras.initializers.Zeros):
        raise ValueError(
            f"`gate_initializer` {why}. Received: gate_initializer="
            f"{keras.initializers.serialize(gate_initializer)!r}"
        )
