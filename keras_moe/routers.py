"""Routers: the layers that choose each token's experts and their gates.

One interface for every router of `MixtureOfExperts`: a `Router` is a Keras
layer whose `route` returns the routing, a dict of the chosen experts and
their gates (computed once) and what the balancing losses read. The original noisy
top-k gating of Shazeer et al. (2017) is `keras_moe.NoisyTopKGating`; this
module holds the routers of today's MoE models:

- `SoftmaxTopKRouter`: a softmax over all experts, then the top k,
  renormalized or not (Mixtral, Qwen-MoE; with `k=1` and no
  renormalization, Switch, Fedus et al. 2021).
- `SigmoidTopKRouter`: sigmoid scores, the top k chosen with a per-expert
  bias that balances the load without a loss (DeepSeek-V3).
- `ExpertChoiceRouter`: each expert takes its top tokens (Zhou et al. 2022).

All router math runs in float32 under every dtype policy. docs/routers.md
says what each router does and costs.
"""

import collections

import keras
import tensorflow as tf

from keras_moe import validation

#: The entries of a token-choice routing (`Router.call` returns a dict
#: with them; `logits` and `load` are optional):
#: `expert_index`, int32 `[tokens, k]`, the experts each token chose;
#: `expert_gates`, float32 `[tokens, k]`, their gates (combine weights);
#: `probabilities`, float32 `[tokens, num_experts]`, the router
#: probabilities (the switch loss's P; rows sum to 1);
#: `logits`, float32 `[tokens, num_experts]` (the z-loss's);
#: `load`, float32 `[num_experts]`, a differentiable load estimate (noisy
#: top-k; without it the load is the count of chosen pairs).
TOKEN_CHOICE_KEYS = ("expert_index", "expert_gates", "probabilities")

#: The entries of an expert-choice routing (`logits` optional):
#: `token_index`, int32 `[num_experts, capacity]`, the token in each slot
#: (`tokens` for an empty slot); `token_gates`, float32 `[num_experts,
#: capacity]`, each slot's gate (0 when empty); `probabilities` and
#: `logits` as above.
EXPERT_CHOICE_KEYS = ("token_index", "token_gates", "probabilities")


class Router(keras.layers.Layer):
    """Base class of the routers of `MixtureOfExperts`.

    A router reads tokens `[tokens, d]` and chooses, for each, `k` of
    `num_experts` experts and their gates (token choice), or, with
    `expert_choice = True`, for each expert the tokens of its `capacity`
    slots (expert choice). It computes that choice once: the dispatchers of
    `MixtureOfExperts` use it as it is.

    To write a router, subclass this, build its weights in `build` and
    return a dict from `call(inputs, training=None, mask=None)`:
    `expert_index` int32 `[tokens, k]`, `expert_gates` float32
    `[tokens, k]`, `probabilities` float32 `[tokens, num_experts]`, and
    optionally `logits` (for `router_z_loss_coef`) and `load`
    (`TOKEN_CHOICE_KEYS` says what each is); masked tokens (`mask` False)
    must get zero gates and zero probabilities. Register it
    (`keras.saving.register_keras_serializable`) and give it a complete
    `get_config`, and `MixtureOfExperts(router=MyRouter(...))` saves and
    loads it. An expert-choice router sets `expert_choice = True` and
    takes `capacity` in `call`, returning `token_index`, `token_gates`
    and `probabilities` (`EXPERT_CHOICE_KEYS`).

    `update(statistics)` is called after each training call with the
    batch's statistics, summed over replicas (`counts`, float32
    `[num_experts]`, the chosen (token, expert) pairs per expert, and
    `num_tokens`): a router that balances itself (`SigmoidTopKRouter`)
    updates its state there.

    Args:
        num_experts: int >= 1.
        k: int in `[1, num_experts]`, the experts each token uses (with
            expert choice, the average).
        **kwargs: base layer keyword arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: a float tensor `[tokens, d]`.
        training: Python bool.
        mask: optional bool tensor `[tokens]`; masked tokens reach no
            expert and count in no statistic.

    Returns:
        The routing, a dict (see above).

    Example:

    >>> class FirstExperts(Router):
    ...     # Every token to experts 0 .. k-1, with equal gates.
    ...     def call(self, inputs, training=None, mask=None):
    ...         tokens = tf.shape(inputs)[0]
    ...         index = tf.tile(tf.range(self.k)[None], [tokens, 1])
    ...         gates = tf.fill([tokens, self.k], 1.0 / self.k)
    ...         probabilities = tf.one_hot(index[:, 0], self.num_experts)
    ...         return {"expert_index": index, "expert_gates": gates,
    ...                 "probabilities": probabilities}
    >>> routing = FirstExperts(4, k=2)(tf.ones([3, 5]))
    >>> routing["expert_index"].numpy().tolist()
    [[0, 1], [0, 1], [0, 1]]
    """

    #: Whether each expert chooses its tokens (expert choice) rather than
    #: each token its experts.
    expert_choice = False

    def __init__(self, num_experts, k=2, **kwargs):
        super().__init__(**kwargs)
        self.num_experts = validation.check_int("num_experts", num_experts, 1)
        self.k = validation.check_int("k", k, 1, self.num_experts)
        # Router math is float32 under every policy: Keras must neither
        # round the inputs to float16 nor autocast the kernels.
        self.autocast = False
        # `mask` is consumed here; no output carries it on.
        self.supports_masking = True

    def __call__(self, inputs, *args, **kwargs):
        validation.check_known_rank("inputs", inputs)
        return super().__call__(inputs, *args, **kwargs)

    def call(self, inputs, training=None, mask=None):
        raise NotImplementedError(
            f"{type(self).__name__} must define `call(inputs, training=None, "
            "mask=None)`, returning the routing dict (see `Router`)."
        )

    def route(self, inputs, training=None, noise=None, mask=None,
              capacity=None):
        """The routing (a dict) of `inputs [tokens, d]`: what `MixtureOfExperts`
        calls. `noise` is the noisy top-k gating's draw (no other router
        takes one); `capacity`, the slots per expert, is given to
        expert-choice routers."""
        if noise is not None:
            raise ValueError(
                f"`noise` is the draw of the noisy top-k gating; "
                f"{type(self).__name__} takes none. Received: noise={noise!r}"
            )
        kwargs = {"capacity": capacity} if self.expert_choice else {}
        return self(inputs, training=training, mask=mask, **kwargs)

    def update(self, statistics):
        """Updates the router's own state after a training call.

        Args:
            statistics: dict of float32 tensors, summed over replicas:
                `counts` `[num_experts]` (the chosen (token, expert) pairs
                of each expert) and `num_tokens` (the unmasked tokens).
        """

    def expert_state(self):
        """Per-expert state to monitor: a dict from a name to a float
        `[num_experts]` variable (`RoutingMonitor` records each)."""
        return {}

    #: The names of `metric_values`' scalars.
    metric_names = ()

    def metric_values(self):
        """Scalar metrics of the router's state, one per `metric_names`
        (the MoE layer logs them as `{layer name}_{name}`)."""
        return {}

    def compute_mask(self, inputs, mask=None):
        return None

    def get_config(self):
        base_config = super().get_config()
        config = {"num_experts": self.num_experts, "k": self.k}
        return {**base_config, **config}


class _LinearRouter(Router):
    """A router whose logits are `inputs @ gate_kernel` (`[d,
    num_experts]`), its input optionally jittered while training."""

    def __init__(self, num_experts, k=2, jitter=0.0,
                 kernel_initializer="zeros", seed=None, **kwargs):
        super().__init__(num_experts, k=k, **kwargs)
        self.jitter = validation.check_non_negative_float("jitter", jitter)
        if self.jitter >= 1:
            raise ValueError(
                "`jitter` must be in [0, 1): the inputs are multiplied by "
                f"uniform(1 - jitter, 1 + jitter). Received: jitter={jitter}"
            )
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        if seed is not None:
            validation.check_int("seed", seed, 0)
        self.seed = seed
        self.seed_generator = (
            keras.random.SeedGenerator(seed) if self.jitter > 0 else None
        )

    def build(self, input_shape):
        validation.check_input_shape("inputs", input_shape, 2, 2)
        self.gate_kernel = self.add_weight(
            name="gate_kernel",
            shape=(input_shape[-1], self.num_experts),
            initializer=self.kernel_initializer,
            autocast=False,
        )

    @property
    def input_dim(self):
        return self.gate_kernel.shape[-2] if self.built else None

    def logits(self, inputs, training=None, mask=None):
        """`(logits, mask)`: float32 `[tokens, num_experts]` logits of the
        (jittered, while training) inputs, and the mask checked (bool
        `[tokens]`, or None)."""
        x = validation.check_float_tensor("inputs", inputs)
        validation.check_input_shape("inputs", x.shape, 2, 2, self.input_dim)
        x = tf.cast(x, tf.float32)
        if mask is not None:
            mask = validation.check_leading_shape(
                "mask", tf.cast(validation.to_tensor("mask", mask), tf.bool),
                x, "inputs",
            )
            # Masked rows are never read (padding may hold NaN).
            x = tf.where(tf.expand_dims(mask, 1), x, 0.0)
        x = validation.check_finite("inputs", x)
        if self.jitter > 0 and bool(training):
            # Multiplicative jitter (Switch, Mixtral): the router sees its
            # input scaled by uniform(1 - eps, 1 + eps), entry by entry.
            x *= tf.random.stateless_uniform(
                tf.shape(x), seed=self._jitter_seed(),
                minval=1.0 - self.jitter, maxval=1.0 + self.jitter,
            )
        logits = tf.matmul(x, tf.cast(self.gate_kernel, tf.float32))
        logits = validation.check_finite_rows(
            "inputs", logits, x,
            "gives router logits (inputs @ gate_kernel) that overflow "
            "float32: a token's values are too large for the gate kernel.",
        )
        return logits, mask

    def _jitter_seed(self):
        """The next seed of the jitter stream, distinct on each replica (a
        mirrored `SeedGenerator` gives every replica the same one)."""
        seed = self.seed_generator.next()
        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            replica_id = tf.cast(context.replica_id_in_sync_group, seed.dtype)
            seed = tf.random.experimental.stateless_fold_in(seed, replica_id)
        return seed

    def get_config(self):
        base_config = super().get_config()
        config = {
            "jitter": self.jitter,
            "kernel_initializer": keras.initializers.serialize(
                self.kernel_initializer
            ),
            "seed": self.seed,
        }
        return {**base_config, **config}


def _masked(values, mask):
    """`values [tokens, ...]` with the rows of masked tokens zero."""
    if mask is None:
        return values
    mask = tf.reshape(mask, [-1] + [1] * (values.shape.rank - 1))
    return tf.where(mask, values, tf.zeros((), values.dtype))


def _normalized(gates):
    """Each row of `gates` over its sum (a row of zeros stays zero)."""
    total = tf.reduce_sum(gates, 1, keepdims=True)
    return gates / tf.where(total > 0, total, 1.0)


@keras.saving.register_keras_serializable(package="keras_moe")
class SoftmaxTopKRouter(_LinearRouter):
    """Softmax top-k router: Mixtral, Qwen-MoE, and Switch with `k=1`.

    From Jiang et al. (2024), "Mixtral of Experts"
    (https://arxiv.org/abs/2401.04088), and, with `k=1` and
    `normalize_top_k=False`, Fedus et al. (2021), "Switch Transformers"
    (https://arxiv.org/abs/2101.03961). The probabilities are a softmax of
    the logits `x @ gate_kernel` over all experts; each token takes its `k`
    most probable experts, with their probabilities as gates, renormalized
    to sum to 1 when `normalize_top_k` (Mixtral; the same as a softmax over
    the top `k` logits). Ties go to the lower expert index.

    Args:
        num_experts: int >= 1.
        k: int in `[1, num_experts]`.
        normalize_top_k: bool; renormalize the top-k probabilities.
        jitter: float in `[0, 1)`; while training, the router's input is
            multiplied by uniform(1 - jitter, 1 + jitter) noise (Switch).
        kernel_initializer: initializer of `gate_kernel` `[d, num_experts]`.
        seed: optional int, the seed of the jitter.
        **kwargs: base layer keyword arguments.

    Call arguments:
        inputs: a float tensor `[tokens, d]`.
        training: Python bool; jitter only when true.
        mask: optional bool tensor `[tokens]`.

    Returns:
        The routing, a dict of `expert_index`, `expert_gates`,
        `probabilities` and `logits`.

    Example:

    >>> router = SoftmaxTopKRouter(num_experts=4, k=2)
    >>> routing = router(np.random.rand(3, 8).astype("float32"))
    >>> routing["expert_index"].shape, routing["expert_gates"].shape
    (TensorShape([3, 2]), TensorShape([3, 2]))
    >>> np.allclose(routing["expert_gates"].numpy().sum(1), 1.0)
    True
    """

    def __init__(self, num_experts, k=2, normalize_top_k=True, jitter=0.0,
                 kernel_initializer="zeros", seed=None, **kwargs):
        super().__init__(num_experts, k=k, jitter=jitter,
                         kernel_initializer=kernel_initializer, seed=seed,
                         **kwargs)
        self.normalize_top_k = validation.check_bool(
            "normalize_top_k", normalize_top_k)

    def call(self, inputs, training=None, mask=None):
        logits, mask = self.logits(inputs, training=training, mask=mask)
        probabilities = tf.nn.softmax(logits)
        top_probabilities, expert_index = tf.math.top_k(probabilities, self.k)
        gates = (_normalized(top_probabilities) if self.normalize_top_k
                 else top_probabilities)
        return {
            "expert_index": expert_index,
            "expert_gates": _masked(gates, mask),
            "probabilities": _masked(probabilities, mask),
            "logits": logits,
        }

    def get_config(self):
        base_config = super().get_config()
        return {**base_config, "normalize_top_k": self.normalize_top_k}


@keras.saving.register_keras_serializable(package="keras_moe")
class SigmoidTopKRouter(_LinearRouter):
    """Sigmoid top-k router with loss-free load balancing (DeepSeek-V3).

    From DeepSeek-AI (2024), "DeepSeek-V3 Technical Report"
    (https://arxiv.org/abs/2412.19437), section 2.1.2, and Wang et al.
    (2024), "Auxiliary-Loss-Free Load Balancing Strategy for
    Mixture-of-Experts" (https://arxiv.org/abs/2408.15664). Each expert's
    score is `s = sigmoid(x @ gate_kernel)`; each token takes the `k`
    experts of largest `s + expert_bias`, and their gates are their scores
    `s` (not the bias), normalized to sum to 1 when `normalize_top_k`.

    `expert_bias` (`[num_experts]`, not trainable, saved with the model) is
    used only to choose. After each training call (`update`), with the load
    `c_i` of the batch (chosen (token, expert) pairs, summed over replicas),
    `expert_bias += bias_update_rate * sign(mean(c) - c_i)`: an overloaded
    expert becomes less likely to be chosen. The probabilities that the
    switch loss reads are the scores normalized over all experts
    (DeepSeek-V3's sequence-wise loss).

    Args:
        num_experts: int >= 1.
        k: int in `[1, num_experts]`.
        normalize_top_k: bool; normalize the chosen scores.
        bias_update_rate: float >= 0, the paper's `u` (1e-3).
        jitter: float in `[0, 1)`, multiplicative input jitter while
            training.
        kernel_initializer: initializer of `gate_kernel`.
        seed: optional int, the seed of the jitter.
        **kwargs: base layer keyword arguments.

    Call arguments:
        inputs: a float tensor `[tokens, d]`.
        training: Python bool.
        mask: optional bool tensor `[tokens]`.

    Returns:
        The routing, a dict of `expert_index`, `expert_gates`,
        `probabilities` and `logits`.

    Example:

    >>> router = SigmoidTopKRouter(num_experts=4, k=2)
    >>> routing = router(np.random.rand(6, 8).astype("float32"))
    >>> router.update({"counts": tf.constant([6.0, 6.0, 0.0, 0.0]),
    ...                "num_tokens": tf.constant(6.0)})
    >>> (router.expert_bias.numpy() * 1000).round(3).tolist()
    [-1.0, -1.0, 1.0, 1.0]
    """

    def __init__(self, num_experts, k=2, normalize_top_k=True,
                 bias_update_rate=1e-3, jitter=0.0,
                 kernel_initializer="zeros", seed=None, **kwargs):
        super().__init__(num_experts, k=k, jitter=jitter,
                         kernel_initializer=kernel_initializer, seed=seed,
                         **kwargs)
        self.normalize_top_k = validation.check_bool(
            "normalize_top_k", normalize_top_k)
        self.bias_update_rate = validation.check_non_negative_float(
            "bias_update_rate", bias_update_rate)

    def build(self, input_shape):
        super().build(input_shape)
        self.expert_bias = self.add_weight(
            name="expert_bias",
            shape=(self.num_experts,),
            initializer="zeros",
            trainable=False,
            autocast=False,
            # Every replica computes the same update from the global load.
            aggregation="only_first_replica",
        )

    def call(self, inputs, training=None, mask=None):
        logits, mask = self.logits(inputs, training=training, mask=mask)
        scores = tf.nn.sigmoid(logits)
        # The bias chooses; it neither weighs nor gets a gradient.
        _, expert_index = tf.math.top_k(
            tf.stop_gradient(scores) + tf.cast(self.expert_bias, tf.float32),
            self.k,
        )
        gates = tf.gather(scores, expert_index, batch_dims=1)
        if self.normalize_top_k:
            gates = _normalized(gates)
        return {
            "expert_index": expert_index,
            "expert_gates": _masked(gates, mask),
            "probabilities": _masked(_normalized(scores), mask),
            "logits": logits,
        }

    def update(self, statistics):
        counts = tf.stop_gradient(statistics["counts"])
        step = self.bias_update_rate * tf.sign(tf.reduce_mean(counts) - counts)
        # A batch without tokens says nothing about the load.
        self.expert_bias.assign_add(
            tf.where(statistics["num_tokens"] > 0, step, 0.0))

    def expert_state(self):
        return {"expert_bias": self.expert_bias}

    metric_names = ("bias_spread",)

    def metric_values(self):
        bias = tf.convert_to_tensor(self.expert_bias)
        return {"bias_spread": tf.reduce_max(bias) - tf.reduce_min(bias)}

    def get_config(self):
        base_config = super().get_config()
        config = {
            "normalize_top_k": self.normalize_top_k,
            "bias_update_rate": self.bias_update_rate,
        }
        return {**base_config, **config}


@keras.saving.register_keras_serializable(package="keras_moe")
class ExpertChoiceRouter(_LinearRouter):
    """Expert-choice router: each expert takes its top tokens.

    From Zhou et al. (2022), "Mixture-of-Experts with Expert Choice
    Routing" (https://arxiv.org/abs/2202.09368). The scores are a softmax of
    the logits over the experts, `S = softmax(x @ gate_kernel)`
    `[tokens, num_experts]`; expert `e` takes the `capacity` tokens of
    largest `S[:, e]` (ties to the lower token index), each with gate
    `S[t, e]`. A token may be taken by several experts or by none; every
    expert is full (unless there are fewer unmasked tokens than slots), so
    the load is balanced by construction. `MixtureOfExperts` computes
    `capacity = ceil(capacity_factor * tokens * k / num_experts)`: `k` is
    the average number of experts per token (the paper's capacity factor
    c, with `capacity_factor=1`).

    Static shapes: it compiles with XLA.

    Args:
        num_experts: int >= 1.
        k: int in `[1, num_experts]`, the average experts per token.
        jitter: float in `[0, 1)`, multiplicative input jitter while
            training.
        kernel_initializer: initializer of `gate_kernel`.
        seed: optional int, the seed of the jitter.
        **kwargs: base layer keyword arguments.

    Call arguments:
        inputs: a float tensor `[tokens, d]`.
        training: Python bool.
        mask: optional bool tensor `[tokens]`; a masked token fills no slot.
        capacity: int or int32 scalar tensor >= 1, slots per expert.

    Returns:
        The routing, a dict of `token_index` and `token_gates`
        `[num_experts, capacity]` (empty slots hold token `tokens` and gate
        0), `probabilities` and `logits`.

    Example:

    >>> router = ExpertChoiceRouter(num_experts=2, k=1)
    >>> routing = router(np.random.rand(4, 3).astype("float32"), capacity=2)
    >>> routing["token_index"].shape
    TensorShape([2, 2])
    """

    expert_choice = True

    def call(self, inputs, training=None, mask=None, capacity=None):
        if capacity is None:
            raise ValueError(
                "`ExpertChoiceRouter` needs `capacity`, the slots of each "
                "expert. Received: capacity=None"
            )
        logits, mask = self.logits(inputs, training=training, mask=mask)
        scores = tf.nn.softmax(logits)
        tokens = tf.shape(scores)[0]
        # Masked tokens score -1, padding -2: below every probability, so
        # that an expert with more slots than tokens fills them last (the
        # padding keeps `top_k` valid when `capacity` exceeds the tokens).
        choosable = (scores if mask is None
                     else tf.where(tf.expand_dims(mask, 1), scores, -1.0))
        padded = tf.concat(
            [choosable, tf.fill([capacity, self.num_experts], -2.0)], 0)
        top_scores, token_index = tf.math.top_k(
            tf.transpose(padded), capacity)
        used = top_scores >= 0.0
        return {
            "token_index": tf.where(used, token_index, tokens),
            "token_gates": tf.where(used, top_scores, 0.0),
            "probabilities": _masked(scores, mask),
            "logits": logits,
        }
