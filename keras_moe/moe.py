"""The Sparsely-Gated Mixture-of-Experts layer: the original
`LocalMixtureOfExperts` as a Keras layer."""

import keras
import tensorflow as tf

from keras_moe import balance, validation
from keras_moe.dispatch import SparseDispatcher
from keras_moe.experts import FeedForwardExperts
from keras_moe.gating import NoisyTopKGating


@keras.saving.register_keras_serializable(package="keras_moe")
class MixtureOfExperts(keras.layers.Layer):
    """Sparsely-Gated Mixture-of-Experts layer.

    From Shazeer et al. (2017), "Outrageously Large Neural Networks: The
    Sparsely-Gated Mixture-of-Experts Layer"
    (https://arxiv.org/abs/1701.06538); a port of the original
    `LocalMixtureOfExperts`. Every position of the input (all axes but the
    last) is a token. A noisy top-k gating network (`.gating`) picks `k` of
    `num_experts` feed-forward experts (`.experts`) per token; only those
    experts run on it, and the output is the gate-weighted sum of their
    outputs.

    The layer adds the paper's balancing loss with `add_loss`:
    `loss_coef * (cv_squared(importance) + cv_squared(load))`, where
    `importance` is the sum of each expert's gates over the batch and `load`
    the (smooth, while noisy) number of tokens each expert receives.

    Shapes depend on the routing, so the layer sets `supports_jit = False`.

    Args:
        num_experts: int >= 1.
        k: int in `[1, num_experts]`, experts per token.
        output_dim: int, or None (default) for the input's size.
        hidden_sizes: tuple of ints, the experts' hidden layer sizes.
        hidden_activation: activation of the experts' hidden layers.
        autoscale: bool, the original's expert `autoscale`.
        noisy_gating: bool, tunable gating noise while training.
        noise_epsilon: float >= 0, added to the noise standard deviation.
        loss_coef: float >= 0, the weight of the balancing loss.
        gate_initializer: initializer of the gating kernels (zeros, as the
            original).
        expert_initializer: initializer of each expert's kernels.
        seed: optional int, the seed of the gating noise.
        **kwargs: base layer keyword arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: a float tensor `[..., d]` of rank >= 2.
        training: Python bool; gating noise only when true.
        mask: optional bool tensor `inputs.shape[:-1]`. Masked positions
            are not routed, output zeros and count in neither importance nor
            load.
        gate_multiplier: optional float tensor `inputs.shape[:-1]`
            multiplied into each token's gates (the original's
            `per_example_multiplier`); a zero sends the token nowhere.
        gating_inputs: optional float tensor `[..., d_gate]` with the same
            leading shape: the gate reads it and the experts read `inputs`
            (the original's `xs` and `shadow_xs`).
        return_routing: bool; also return a dict of routing tensors.
        noise: optional float tensor `inputs.shape[:-1] + (num_experts,)`,
            the standard-normal gating draw to use instead of a fresh one.

    Input shape:
        `(..., d)`.

    Output shape:
        `(..., output_dim)`.

    Returns:
        The outputs; with `return_routing=True`, `(outputs, routing)` where
        `routing` holds `gates` `(..., num_experts)` (zero at masked
        positions), `importance` `(num_experts,)`, `load` `(num_experts,)`,
        `aux_loss` (scalar) and `part_sizes` `(num_experts,)` int32.

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
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.loss_coef = validation.check_non_negative_float(
            "loss_coef", loss_coef
        )
        self.supports_masking = True
        self.supports_jit = False
        # Inputs are cast here, the experts' to the compute dtype and the
        # gate's to float32: Keras must not round them (or `noise`) to
        # float16 first. The experts autocast their own kernels.
        self.autocast = False
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
        self.experts = FeedForwardExperts(
            num_experts,
            output_dim,
            hidden_sizes=hidden_sizes,
            hidden_activation=hidden_activation,
            autoscale=autoscale,
            kernel_initializer=expert_initializer,
            dtype=self.dtype_policy,
            name="experts",
        )

    @property
    def num_experts(self):
        return self.gating.num_experts

    def build(self, inputs_shape, gating_inputs_shape=None):
        validation.check_input_shape("inputs", inputs_shape, 2)
        input_dim = inputs_shape[-1]
        if gating_inputs_shape is None:
            gating_dim = input_dim
        else:
            validation.check_input_shape("gating_inputs", gating_inputs_shape, 2)
            gating_dim = gating_inputs_shape[-1]
        self.gating.build((None, gating_dim))
        self.experts.build((None, input_dim))

    def call(
        self,
        inputs,
        training=None,
        mask=None,
        gate_multiplier=None,
        gating_inputs=None,
        return_routing=False,
        noise=None,
    ):
        inputs = validation.check_float_tensor("inputs", inputs)
        input_dim = self.experts.layer_sizes[0]
        validation.check_input_shape("inputs", inputs.shape, 2, None, input_dim)
        leading_shape = tf.shape(inputs)[:-1]
        x = tf.reshape(inputs, [-1, input_dim])
        gate_x = x
        if gating_inputs is not None:
            gating_inputs = validation.check_float_tensor(
                "gating_inputs", gating_inputs
            )
            validation.check_input_shape(
                "gating_inputs", gating_inputs.shape, 2, None,
                self.gating.input_dim,
            )
            gating_inputs = validation.check_leading_shape(
                "gating_inputs", gating_inputs, inputs, "inputs",
                (self.gating.input_dim,),
            )
            gate_x = tf.reshape(gating_inputs, [-1, self.gating.input_dim])
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
            noise = validation.check_float_tensor("noise", noise)
            noise = validation.check_leading_shape(
                "noise", noise, inputs, "inputs", (self.num_experts,)
            )
            noise = tf.reshape(noise, [-1, self.num_experts])
        positions = None
        if mask is not None:
            mask = tf.convert_to_tensor(mask)
            mask = validation.check_leading_shape(
                "mask", tf.cast(mask, tf.bool), inputs, "inputs"
            )
            # Only unmasked tokens reach the gate: they alone are routed and
            # counted in importance and load.
            positions = tf.where(tf.reshape(mask, [-1]))[:, 0]
            x = tf.gather(x, positions)
            gate_x = x if gating_inputs is None else tf.gather(gate_x, positions)
            if multiplier is not None:
                multiplier = tf.gather(multiplier, positions)
            if noise is not None:
                noise = tf.gather(noise, positions)
        if gating_inputs is not None:
            x = validation.check_finite("inputs", x)

        gates, load = self.gating(gate_x, training=training, noise=noise)
        if multiplier is not None:
            gates *= tf.expand_dims(multiplier, 1)
        importance = tf.reduce_sum(gates, 0)
        dispatcher = SparseDispatcher(self.num_experts, gates)
        expert_outputs = self.experts(
            tf.cast(dispatcher.dispatch_concatenated(x), self.compute_dtype),
            dispatcher.part_sizes,
        )
        outputs = dispatcher.combine_concatenated(expert_outputs)
        aux_loss = self.loss_coef * (
            balance.cv_squared(importance) + balance.cv_squared(load)
        )
        self.add_loss(aux_loss)

        output_dim = self.experts.layer_sizes[-1]
        num_tokens = tf.reduce_prod(leading_shape)
        if positions is not None:
            outputs = _scatter_positions(outputs, positions, num_tokens)
        outputs = tf.reshape(
            outputs, tf.concat([leading_shape, [output_dim]], 0)
        )
        outputs = tf.ensure_shape(
            outputs, inputs.shape[:-1].concatenate([output_dim])
        )
        if not return_routing:
            return outputs
        if positions is not None:
            gates = _scatter_positions(gates, positions, num_tokens)
        gates = tf.reshape(
            gates, tf.concat([leading_shape, [self.num_experts]], 0)
        )
        routing = {
            "gates": gates,
            "importance": importance,
            "load": load,
            "aux_loss": aux_loss,
            "part_sizes": dispatcher.part_sizes,
        }
        return outputs, routing

    def compute_output_shape(self, inputs_shape, gating_inputs_shape=None):
        output_dim = self.experts.output_dim or inputs_shape[-1]
        return tuple(inputs_shape[:-1]) + (output_dim,)

    def compute_output_spec(
        self,
        inputs,
        training=None,
        mask=None,
        gate_multiplier=None,
        gating_inputs=None,
        return_routing=False,
        noise=None,
    ):
        outputs = keras.KerasTensor(
            self.compute_output_shape(inputs.shape), dtype=self.compute_dtype
        )
        if not return_routing:
            return outputs
        n = self.num_experts
        routing = {
            "gates": keras.KerasTensor(
                tuple(inputs.shape[:-1]) + (n,), dtype="float32"
            ),
            "importance": keras.KerasTensor((n,), dtype="float32"),
            "load": keras.KerasTensor((n,), dtype="float32"),
            "aux_loss": keras.KerasTensor((), dtype="float32"),
            "part_sizes": keras.KerasTensor((n,), dtype="int32"),
        }
        return outputs, routing

    def compute_mask(self, inputs, mask=None):
        return mask

    def get_config(self):
        base_config = super().get_config()
        gating, experts = self.gating, self.experts
        config = {
            "num_experts": gating.num_experts,
            "k": gating.k,
            "output_dim": experts.output_dim,
            "hidden_sizes": list(experts.hidden_sizes),
            "hidden_activation": keras.activations.serialize(
                experts.hidden_activation
            ),
            "autoscale": experts.autoscale,
            "noisy_gating": gating.noisy_gating,
            "noise_epsilon": gating.noise_epsilon,
            "loss_coef": self.loss_coef,
            "gate_initializer": keras.initializers.serialize(
                gating.kernel_initializer
            ),
            "expert_initializer": keras.initializers.serialize(
                experts.kernel_initializer
            ),
            "seed": gating.seed,
        }
        return {**base_config, **config}


def _scatter_positions(values, positions, num_tokens):
    """Rows of `values` placed at `positions` of a zero `[num_tokens, ...]`."""
    shape = tf.concat(
        [tf.reshape(tf.cast(num_tokens, tf.int64), [1]),
         tf.shape(values, out_type=tf.int64)[1:]], 0
    )
    return tf.scatter_nd(tf.expand_dims(positions, 1), values, shape)
