"""Noisy top-k gating: the original `NoisyTopKGating`, `_MyTopK`,
`_ProbInTopK` and the normal-CDF load estimator."""

import math

import keras
import tensorflow as tf

from keras_moe import initialization, validation
from keras_moe.routers import Router


@keras.saving.register_keras_serializable(package="keras_moe")
class NoisyTopKGating(Router):
    """Noisy top-k gating network of the Sparsely-Gated Mixture-of-Experts.

    From Shazeer et al. (2017), "Outrageously Large Neural Networks: The
    Sparsely-Gated Mixture-of-Experts Layer"
    (https://arxiv.org/abs/1701.06538), section 2.1 and appendix A. Each row
    of the input gets logits `x @ gate_kernel`; while training, normal noise
    with a learned, input-dependent standard deviation
    `softplus(x @ noise_kernel) + noise_epsilon` is added. The gates are a
    softmax over the `k` largest logits of each row and zero elsewhere.

    The load is what the balancing loss reads: when the gating is noisy and
    `k < num_experts` it is the smooth estimate
    `sum_rows P(expert in top k | other noise)` through the normal CDF, so it
    has a gradient; in inference (zero noise) this estimate is the count of
    rows routed to each expert, up to ties. Otherwise it is the true count.

    All gating math runs in float32 whatever the dtype policy, and the
    weights are never autocast.

    It is the `"noisy_top_k"` router of `MixtureOfExperts` (a
    `keras_moe.routers.Router`): `route` gives the same gating as a
    routing dict, the chosen experts computed once.

    Args:
        num_experts: int >= 1, the number of experts `n`.
        k: int in `[1, num_experts]`, the number of experts each row uses.
        noisy_gating: bool, whether to add tunable noise while training
            (the paper's load balancing needs it).
        noise_epsilon: float >= 0, added to the noise standard deviation for
            numerical stability.
        kernel_initializer: initializer of `gate_kernel` and `noise_kernel`.
            The original's default is zeros.
        seed: optional int, the seed of the gating noise.
        **kwargs: base layer keyword arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: a float tensor `[tokens, d]`.
        training: Python bool; noise is added only when true.
        noise: optional float tensor `[tokens, num_experts]`, the
            standard-normal draw to use instead of a fresh one (to replay a
            step or to compare with another implementation).
        mask: optional bool tensor `[tokens]`. Masked rows get zero gates,
            count in neither load nor importance, and are never read (they
            may hold NaN).

    Input shape:
        `(tokens, d)`.

    Output shape:
        gates `(tokens, num_experts)` and load `(num_experts,)`, both float32.

    Returns:
        A tuple `(gates, load)`. Each row of `gates` has `k` non-zeros (fewer
        only if a softmax underflows) summing to 1.

    Example:

    >>> gating = NoisyTopKGating(num_experts=4, k=2)
    >>> gates, load = gating(np.random.rand(3, 8).astype("float32"))
    >>> gates.shape, load.shape
    (TensorShape([3, 4]), TensorShape([4]))
    """

    def __init__(
        self,
        num_experts,
        k=2,
        noisy_gating=True,
        noise_epsilon=1e-2,
        kernel_initializer="zeros",
        seed=None,
        **kwargs,
    ):
        super().__init__(num_experts, k=k, **kwargs)
        self.noisy_gating = validation.check_bool("noisy_gating", noisy_gating)
        self.noise_epsilon = validation.check_non_negative_float(
            "noise_epsilon", noise_epsilon
        )
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        if seed is not None:
            validation.check_int("seed", seed, 0)
        self.seed = seed
        self.seed_generator = (
            keras.random.SeedGenerator(seed) if self.noisy_gating else None
        )

    def build(self, input_shape):
        validation.check_input_shape("inputs", input_shape, 2, 2)
        input_dim = input_shape[-1]
        self.gate_kernel = self.add_weight(
            name="gate_kernel",
            shape=(input_dim, self.num_experts),
            initializer=self.kernel_initializer,
            autocast=False,
        )
        if self.noisy_gating:
            self.noise_kernel = self.add_weight(
                name="noise_kernel",
                shape=(input_dim, self.num_experts),
                # Not the gate kernel's draw again.
                initializer=initialization.reseeded(self.kernel_initializer, 1),
                autocast=False,
            )
        else:
            self.noise_kernel = None

    @property
    def input_dim(self):
        # [d, experts], or stacked [..., d, experts] (SecondaryGating).
        return self.gate_kernel.shape[-2] if self.built else None

    def call(self, inputs, training=None, noise=None, mask=None):
        gates, row_load, _ = self._gate(inputs, training, noise, mask)
        return gates, tf.reduce_sum(row_load, 0)

    def route(self, inputs, training=None, noise=None, mask=None,
              capacity=None):
        """The gating of `call` as a routing dict (see
        `keras_moe.routers.Router`): the chosen experts and their gates, the
        probabilities (a softmax of the noisy logits over all experts), the
        logits and the load."""
        if not self.built:
            self.build(tuple(inputs.shape))
        gates, row_load, top = self._gate(inputs, training, noise, mask)
        expert_index, expert_gates, logits, mask = top
        probabilities = tf.nn.softmax(logits)
        if mask is not None:
            probabilities = tf.where(tf.expand_dims(mask, 1), probabilities,
                                     0.0)
        return {
            "expert_index": expert_index,
            "expert_gates": expert_gates,
            "probabilities": probabilities,
            "logits": logits,
            "load": tf.reduce_sum(row_load, 0),
        }

    def _gate(self, inputs, training, noise, mask):
        """`(gates, row_load, (expert_index, expert_gates, logits, mask))`
        of `call`'s inputs."""
        x = validation.check_float_tensor("inputs", inputs)
        validation.check_input_shape("inputs", x.shape, 2, 2, self.input_dim)
        x = tf.cast(x, tf.float32)
        if mask is not None:
            mask = validation.check_leading_shape(
                "mask", tf.cast(validation.to_tensor("mask", mask), tf.bool), x,
                "inputs",
            )
            # Masked rows are never read: zeros keep NaN padding out of the
            # logits and out of the kernels' gradients.
            x = tf.where(tf.expand_dims(mask, 1), x, 0.0)
        x = validation.check_finite("inputs", x)
        clean_logits = tf.matmul(x, tf.cast(self.gate_kernel, tf.float32))
        noise_logits = None
        if self.noisy_gating and bool(training):
            noise_logits = tf.matmul(
                x, tf.cast(self.noise_kernel, tf.float32))
            if noise is None:
                noise = self.draw_noise(tf.shape(clean_logits))
            else:
                noise = validation.check_float_tensor("noise", noise)
                noise = validation.check_leading_shape(
                    "noise", noise, x, "inputs", (self.num_experts,)
                )
                noise = tf.cast(noise, tf.float32)
                if mask is not None:
                    noise = tf.where(tf.expand_dims(mask, 1), noise, 0.0)
                noise = validation.check_finite("noise", noise)
        gates, row_load, top = self._gate_logits(
            x, clean_logits, noise_logits, noise, mask)
        return gates, row_load, top + (mask,)

    def gate_logits(self, inputs, clean_logits, noise_logits=None,
                    noise=None, mask=None):
        """The gating from logits computed elsewhere, row by row.

        What `call` does after its matmuls, for a caller that computes the
        logits of many gating networks at once (the groups of
        `HierarchicalMixtureOfExperts`): top-k, softmax, and each row's part
        of the load.

        Args:
            inputs: float32 `[rows, d]`, the rows the logits come from (only
                to name a row whose logits overflow).
            clean_logits: float32 `[rows, num_experts]`, `inputs @
                gate_kernel`.
            noise_logits: float32 `[rows, num_experts]`, `inputs @
                noise_kernel`, or None for no noise (inference, or
                `noisy_gating=False`).
            noise: float32 `[rows, num_experts]`, the standard-normal draw
                (with `noise_logits`).
            mask: optional bool `[rows]`; masked rows get zero gates and no
                load.

        Returns:
            `(gates, row_load)`, both float32 `[rows, num_experts]`; the
            load is `reduce_sum(row_load, 0)`.
        """
        gates, row_load, _ = self._gate_logits(
            inputs, clean_logits, noise_logits, noise, mask)
        return gates, row_load

    def _gate_logits(self, inputs, clean_logits, noise_logits, noise, mask):
        """`gate_logits`, and `(expert_index, expert_gates, logits)`: the
        top `k` experts of each row, their gates (zero for masked rows) and
        the (noisy) logits they were chosen by."""
        # A finite token can still overflow the logits; its gates would be
        # NaN, and the dispatch would route it nowhere without a word.
        clean_logits = validation.check_finite_rows(
            "inputs", clean_logits, inputs,
            "gives gate logits (inputs @ gate_kernel) that overflow "
            "float32: a token's values are too large for the gate kernel.",
        )
        if noise_logits is not None:
            noise_stddev = tf.nn.softplus(noise_logits) + self.noise_epsilon
            logits = validation.check_finite_rows(
                "inputs", clean_logits + noise * noise_stddev, inputs,
                "gives noisy gate logits (inputs @ gate_kernel + noise * "
                "softplus(inputs @ noise_kernel)) that overflow float32: "
                "a token's values (or its `noise`) are too large for the "
                "gate and noise kernels.",
            )
        else:
            # The original multiplies the stddev by `train`, so in inference
            # the noise is exactly zero: skip the draw and the noise matmul.
            # (This also keeps the noise kernel's gradient at zero, where the
            # original's is NaN: 0 * inf inside the erf gradient.)
            noise_stddev = tf.zeros_like(clean_logits)
            logits = clean_logits
        top_logits, top_indices = top_k_by_argmax(
            logits, min(self.k + 1, self.num_experts)
        )
        top_k_gates = tf.nn.softmax(top_logits[:, : self.k])
        gates = scatter_rows(
            top_k_gates, top_indices[:, : self.k], self.num_experts
        )
        if mask is not None:
            gates = tf.where(tf.expand_dims(mask, 1), gates, 0.0)
        if self.noisy_gating and self.k < self.num_experts:
            row_load = prob_in_top_k(
                clean_logits, logits, noise_stddev, top_logits, self.k
            )
            if mask is not None:
                row_load = tf.where(tf.expand_dims(mask, 1), row_load, 0.0)
        else:
            # The true count (`balance.gates_to_load`), row by row.
            row_load = tf.cast(gates > 0, tf.float32)
        if mask is not None:
            top_k_gates = tf.where(tf.expand_dims(mask, 1), top_k_gates, 0.0)
        return gates, row_load, (top_indices[:, : self.k], top_k_gates, logits)

    def draw_noise(self, shape):
        """A standard-normal float32 draw of `shape` from the layer's noise
        stream (each call the next; distinct on each replica)."""
        return tf.random.stateless_normal(shape, seed=self._noise_seed())

    def _noise_seed(self):
        """The next seed of the layer's stream, distinct on each replica.

        A `SeedGenerator` is mirrored: without folding in the replica id,
        every replica would draw the same noise for different tokens.
        """
        seed = self.seed_generator.next()
        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            replica_id = tf.cast(context.replica_id_in_sync_group, seed.dtype)
            seed = tf.random.experimental.stateless_fold_in(seed, replica_id)
        return seed

    def compute_output_shape(self, input_shape):
        return (
            (input_shape[0], self.num_experts),
            (self.num_experts,),
        )

    def compute_output_spec(self, inputs, training=None, noise=None, mask=None):
        gates_shape, load_shape = self.compute_output_shape(inputs.shape)
        return (
            keras.KerasTensor(gates_shape, dtype="float32"),
            keras.KerasTensor(load_shape, dtype="float32"),
        )

    def compute_mask(self, inputs, mask=None):
        return None

    def get_config(self):
        base_config = super().get_config()
        config = {
            "num_experts": self.num_experts,
            "k": self.k,
            "noisy_gating": self.noisy_gating,
            "noise_epsilon": self.noise_epsilon,
            "kernel_initializer": keras.initializers.serialize(
                self.kernel_initializer
            ),
            "seed": self.seed,
        }
        return {**base_config, **config}


def top_k_by_argmax(x, k):
    """The original `_MyTopK`: the top `k` values and indices of each row.

    For `k <= 10` it takes `k` successive argmaxes, knocking each winner out,
    as the original (ties go to the lower index, and the gradient of a tied
    maximum is shared as `reduce_max` shares it). The original added -1e9 to
    a winner, which leaves a value above about 1e16 (or more than 1e9 above
    the next) the winner again, returned twice; here a winner becomes -inf,
    the same for every other input. For larger `k` it is `tf.math.top_k`.

    Args:
        x: a float tensor `[rows, n]`.
        k: a Python int, `1 <= k <= n`.

    Returns:
        `(values [rows, k], indices [rows, k] int32)`.
    """
    if k > 10:
        values, indices = tf.math.top_k(x, k)
        return values, tf.cast(indices, tf.int32)
    values = []
    indices = []
    depth = tf.shape(x)[1]
    minus_inf = tf.constant(float("-inf"), x.dtype)
    for i in range(k):
        values.append(tf.reduce_max(x, 1))
        argmax = tf.argmax(x, 1, output_type=tf.int32)
        indices.append(argmax)
        if i + 1 < k:
            x = tf.where(
                tf.one_hot(argmax, depth, True, False, dtype=tf.bool),
                minus_inf, x,
            )
    return tf.stack(values, axis=1), tf.stack(indices, axis=1)


def scatter_rows(values, indices, n):
    """Places `values[b, j]` at column `indices[b, j]` of a zero `[rows, n]`.

    The original `_RowwiseUnsortedSegmentSum`.
    """
    rows = tf.shape(indices)[0]
    k = tf.shape(indices)[1]
    flat_indices = tf.reshape(indices, [-1]) + (
        tf.range(rows * k) // k
    ) * n
    flat = tf.math.unsorted_segment_sum(
        tf.reshape(values, [-1]), flat_indices, rows * n
    )
    return tf.reshape(flat, [rows, n])


def normal_cdf(x, stddev):
    """CDF at `x` of a normal with mean 0 and standard deviation `stddev`.

    The original `_NormalDistributionCDF`, including its 1e-20 guard, so a
    zero stddev gives 0, 0.5 or 1.
    """
    return 0.5 * (1.0 + tf.math.erf(x / (math.sqrt(2) * stddev + 1e-20)))


def prob_in_top_k(clean_values, noisy_values, noise_stddev, top_values, k):
    """The original `_ProbInTopK`: P(each value is in its row's top k).

    For each entry, the probability under fresh noise that its clean value
    plus noise beats the k-th largest of the *other* noisy values: the
    (k+1)-th noisy value if the entry is in the top k now, else the k-th.

    Args:
        clean_values: `[rows, n]` logits without noise.
        noisy_values: `[rows, n]` logits with noise.
        noise_stddev: `[rows, n]` standard deviation of that noise.
        top_values: `[rows, m]` the top `m >= k + 1` noisy values per row.
        k: a Python int.

    Returns:
        A float32 tensor `[rows, n]`.
    """
    threshold_if_in = top_values[:, k : k + 1]
    threshold_if_out = top_values[:, k - 1 : k]
    is_in = tf.greater(noisy_values, threshold_if_in)
    prob_if_in = normal_cdf(clean_values - threshold_if_in, noise_stddev)
    prob_if_out = normal_cdf(clean_values - threshold_if_out, noise_stddev)
    return tf.where(is_in, prob_if_in, prob_if_out)
