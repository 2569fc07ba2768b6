"""The second level of the hierarchical layer: one noisy top-k gating per
group, all groups' weights in stacked variables."""

import keras
import tensorflow as tf

from keras_moe import grouped_feed_forward, initialization, validation
from keras_moe.gating import NoisyTopKGating


@keras.saving.register_keras_serializable(package="keras_moe")
class SecondaryGating(NoisyTopKGating):
    """`num_groups` noisy top-k gatings of `experts_per_group` experts each.

    The secondary gating networks of Shazeer et al. (2017,
    https://arxiv.org/abs/1701.06538), appendix B: group `i`'s gating is
    the original `noisy_top_k_gating` with the kernels `gate_kernel[i]` and
    `noise_kernel[i]`, variables `[num_groups, d, experts_per_group]`. Each
    row is gated by the group it was routed to (rows come group by group,
    as the primary `SparseDispatcher.dispatch_concatenated` returns them), so
    one call computes every group's gates with a graph whose size does not
    depend on `num_groups`. `HierarchicalMixtureOfExperts` owns one.

    Args:
        num_groups: int >= 1.
        experts_per_group: int >= 1.
        k: int in `[1, experts_per_group]`, experts per row.
        noisy_gating, noise_epsilon: as in `NoisyTopKGating`.
        kernel_initializer: initializer of each group's kernels (each
            group draws its own values, as a separate 2-D variable would).
        seed: optional int, the seed of the noise (one stream for all
            groups).
        **kwargs: base layer keyword arguments.

    Call arguments:
        inputs: float `[rows, d]`, group 0's rows first, then group 1's,
            and so on.
        group_sizes: int `[num_groups]`, how many rows each group has; it
            sums to `rows`.
        training: bool; noise is added only when training.
        noise: optional float `[rows, experts_per_group]`, the
            standard-normal draw to use instead of the layer's own.

    Input shape:
        `(rows, d)` and `(num_groups,)`.

    Output shape:
        `(rows, experts_per_group)` twice.

    Returns:
        `(gates, row_load)`, float32: each row's gates over its group's
        experts and its part of the group's smooth load.

    Example:

    >>> gating = SecondaryGating(num_groups=3, experts_per_group=4, k=2)
    >>> gates, row_load = gating(np.random.rand(5, 8).astype("float32"),
    ...                          group_sizes=tf.constant([2, 0, 3]))
    >>> gates.shape, row_load.shape
    (TensorShape([5, 4]), TensorShape([5, 4]))
    """

    def __init__(
        self,
        num_groups,
        experts_per_group,
        k=2,
        noisy_gating=True,
        noise_epsilon=1e-2,
        kernel_initializer="zeros",
        seed=None,
        **kwargs,
    ):
        super().__init__(
            experts_per_group,
            k=k,
            noisy_gating=noisy_gating,
            noise_epsilon=noise_epsilon,
            kernel_initializer=kernel_initializer,
            seed=seed,
            **kwargs,
        )
        self.num_groups = validation.check_int("num_groups", num_groups, 1)
        # Rows are never masked here: the primary routing sends none.
        self.supports_masking = False

    @property
    def experts_per_group(self):
        return self.num_experts

    def build(self, input_shape):
        validation.check_input_shape("inputs", input_shape, 2, 2)
        shape = (self.num_groups, input_shape[-1], self.num_experts)
        self.gate_kernel = self.add_weight(
            name="gate_kernel",
            shape=shape,
            initializer=initialization.stacked(
                self.kernel_initializer, self.num_groups),
            autocast=False,
        )
        self.noise_kernel = None
        if self.noisy_gating:
            self.noise_kernel = self.add_weight(
                name="noise_kernel",
                shape=shape,
                # Not the gate kernels' draws again.
                initializer=initialization.stacked(
                    self.kernel_initializer, self.num_groups,
                    offset=self.num_groups),
                autocast=False,
            )

    def call(self, inputs, group_sizes=None, training=None, noise=None):
        x = validation.check_float_tensor("inputs", inputs)
        validation.check_input_shape("inputs", x.shape, 2, 2, self.input_dim)
        if group_sizes is None:
            raise ValueError(
                "`SecondaryGating` needs `group_sizes`, the number of rows "
                "of each group. Received: group_sizes=None"
            )
        group_sizes = validation.check_part_sizes(
            group_sizes, self.num_groups, tf.shape(x)[0], name="group_sizes",
            part="group",
        )
        x = validation.check_finite("inputs", tf.cast(x, tf.float32))

        def logits(kernel):
            # Group `i`'s kernel `kernel[i]` is, to `grouped_feed_forward`,
            # expert `i`, and its `group_sizes[i]` rows are that expert's
            # part.
            return grouped_feed_forward.grouped_feed_forward(
                x, [tf.cast(kernel, tf.float32)], group_sizes,
                lambda layer, z: z,
            )

        clean_logits = logits(self.gate_kernel)
        noise_logits = None
        if self.noisy_gating and bool(training):
            noise_logits = logits(self.noise_kernel)
            if noise is None:
                noise = self.draw_noise(tf.shape(clean_logits))
            else:
                noise = validation.check_float_tensor("noise", noise)
                noise = validation.check_leading_shape(
                    "noise", noise, x, "inputs", (self.num_experts,)
                )
                noise = validation.check_finite(
                    "noise", tf.cast(noise, tf.float32))
        return self.gate_logits(x, clean_logits, noise_logits, noise)

    def compute_output_shape(self, input_shape, group_sizes_shape=None):
        shape = (input_shape[0], self.num_experts)
        return shape, shape

    def compute_output_spec(self, inputs, group_sizes=None, training=None,
                            noise=None):
        gates_shape, row_load_shape = self.compute_output_shape(inputs.shape)
        return (
            keras.KerasTensor(gates_shape, dtype="float32"),
            keras.KerasTensor(row_load_shape, dtype="float32"),
        )

    def get_config(self):
        config = super().get_config()
        del config["num_experts"]
        return {
            **config,
            "num_groups": self.num_groups,
            "experts_per_group": self.num_experts,
        }
