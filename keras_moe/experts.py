"""Feed-forward experts: all `num_experts` of the original
`FeedForwardExpert` in one layer, with stacked kernels."""

import keras
import tensorflow as tf

from keras_moe import (
    all_to_all, expert_shards, grouped_feed_forward, initialization,
    private_hooks, validation,
)


@keras.saving.register_keras_serializable(package="keras_moe")
class FeedForwardExperts(keras.layers.Layer):
    """`num_experts` feed-forward networks without biases, stacked.

    The original `FeedForwardExpert` of Shazeer et al. (2017,
    https://arxiv.org/abs/1701.06538), all experts in one layer: layer `l`
    of every expert is `kernels[l]`, a variable `[num_experts, in_l, out_l]`,
    and expert `i` is `kernels[l][i]`. Each layer is a matmul, then (with
    `autoscale`) a multiplication by `(in_l / input_dim) ** -0.5` for layers
    whose input size differs from the input's, then the hidden activation
    (not after the last layer).

    With `glu=True` every hidden layer is a gated linear unit (Dauphin et
    al. 2017, https://arxiv.org/abs/1612.08083; Shazeer 2020,
    https://arxiv.org/abs/2002.05202), `hidden_activation(a @ W_gate) *
    (a @ W_up)`: SwiGLU with `"silu"`, GeGLU with `"gelu"`, the experts of
    Mixtral and Qwen-MoE.

    Weight layout with `glu`: a gated layer of size `h` keeps `W_gate` and
    `W_up` side by side in one kernel, `kernels[l]` of shape
    `[num_experts, in_l, 2 * h]`; `kernels[l][i, :, :h]` is expert `i`'s
    `W_gate` and `kernels[l][i, :, h:]` its `W_up`. The last layer
    (`W_down`) is `[num_experts, h, output_dim]`, as without `glu`. Each
    layer stays one `[num_experts, in, out]` kernel, so sharding over
    replicas, saving and `call_expert` work as without `glu`. keras-hub's
    Mixtral and Qwen-MoE experts (gate and up kernels `[E, d, h]`, a down
    kernel `[E, h, d]`, no biases) load into `FeedForwardExperts(E, d,
    hidden_sizes=(h,), hidden_activation="silu", autoscale=False,
    glu=True)` as `kernels[0].assign(np.concatenate([gate, up], axis=-1))`
    and `kernels[1].assign(down)`.

    `autoscale` with `glu`: as in the original, the scale multiplies a
    layer's matmul output before the activation; for a gated layer that
    is both halves (the same as scaling the layer's input). With one
    hidden layer, only the last layer is scaled (by `(h / input_dim) **
    -0.5`), as without `glu`. keras-hub does not scale: load its weights
    with `autoscale=False`.

    Each expert's slice of a kernel is initialized as if it were its own 2-D
    variable (fan-in and fan-out of one expert, a different draw per
    expert), as the original's separate variables were; with `glu`, each
    expert's `W_gate` and `W_up` are drawn as two such `[in, h]`
    variables.

    Args:
        num_experts: int >= 1.
        output_dim: int >= 1, or None for the input's size.
        hidden_sizes: tuple of ints, the hidden layer sizes (empty: one
            linear layer).
        hidden_activation: activation after each hidden layer (with
            `glu`, of its gate half).
        autoscale: bool, the original's `autoscale`.
        kernel_initializer: initializer of each expert's kernels.
        glu: bool. When True every hidden layer is a gated linear unit,
            `hidden_activation(a @ W_gate) * (a @ W_up)`; needs at least
            one hidden layer.
        expert_parallel: bool. When True and built in the scope of a
            `tf.distribute` strategy of R > 1 replicas (MirroredStrategy),
            replica `r` holds only experts `[r * E / R, (r + 1) * E / R)`,
            on its own device (`kernels[l]` is then a
            `expert_shards.ShardedKernel`); in a replica function, 3-D
            inputs are exchanged with an all-to-all so that each replica
            runs its experts on the slabs of every replica. Train it with
            `keras_moe.ExpertParallelOptimizer`. Saved and loaded as the
            whole kernels, so it loads at any R. Without a strategy (or
            with one replica) it changes nothing.
        **kwargs: base layer keyword arguments.

    Call arguments:
        inputs: a float tensor, either `[rows, d]` sorted by expert
            (expert 0's rows first, then expert 1's, and so on: what
            `SparseDispatcher.dispatch_concatenated` returns) with
            `part_sizes`, or `[num_experts, capacity, d]`, one slab per
            expert (what `CapacityDispatcher.dispatch` returns), without.
        part_sizes: int tensor `[num_experts]`, how many rows each expert
            has; it sums to `rows`. Only with 2-D inputs.

    Input shape:
        `(rows, d)` and `(num_experts,)`, or `(num_experts, capacity, d)`.

    Output shape:
        `(rows, output_dim)` or `(num_experts, capacity, output_dim)`.

    Returns:
        Each row passed through its expert, in the same order.

    Example:

    >>> experts = FeedForwardExperts(num_experts=3, output_dim=4,
    ...                              hidden_sizes=(16,))
    >>> y = experts(tf.ones([5, 8]), part_sizes=tf.constant([2, 0, 3]))
    >>> y.shape
    TensorShape([5, 4])

    SwiGLU experts, with each hidden kernel holding `W_gate` then `W_up`:

    >>> swiglu = FeedForwardExperts(num_experts=3, output_dim=4,
    ...                             hidden_sizes=(16,),
    ...                             hidden_activation="silu", glu=True)
    >>> swiglu(tf.ones([3, 2, 8])).shape  # one slab of 2 rows per expert
    TensorShape([3, 2, 4])
    >>> [tuple(kernel.shape) for kernel in swiglu.kernels]
    [(3, 8, 32), (3, 16, 4)]
    """

    def __init__(
        self,
        num_experts,
        output_dim,
        hidden_sizes=(),
        hidden_activation="relu",
        autoscale=True,
        kernel_initializer="glorot_uniform",
        expert_parallel=False,
        glu=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_experts = validation.check_int("num_experts", num_experts, 1)
        self.expert_parallel = validation.check_bool(
            "expert_parallel", expert_parallel)
        self.num_shards = 1
        self.output_dim = (
            None if output_dim is None
            else validation.check_int("output_dim", output_dim, 1)
        )
        self.hidden_sizes = validation.check_sizes("hidden_sizes", hidden_sizes)
        self.hidden_activation = keras.activations.get(hidden_activation)
        self.autoscale = validation.check_bool("autoscale", autoscale)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.glu = validation.check_bool("glu", glu)
        if self.glu and not self.hidden_sizes:
            raise ValueError(
                "`glu=True` gates the hidden layers, and `hidden_sizes` has "
                "none: give at least one hidden size, or `glu=False`. "
                f"Received: glu={glu}, hidden_sizes={hidden_sizes!r}"
            )

    def build(self, input_shape):
        validation.check_input_shape("inputs", input_shape, 2, 3)
        input_dim = input_shape[-1]
        output_dim = self.output_dim or input_dim
        self.layer_sizes = (input_dim, *self.hidden_sizes, output_dim)
        shapes = list(zip(self.layer_sizes[:-1], self.layer_sizes[1:]))
        num_layers = len(shapes)
        # A gated hidden layer holds W_gate and W_up side by side.
        shapes = [
            (fan_in, 2 * fan_out if self._gated(layer) else fan_out)
            for layer, (fan_in, fan_out) in enumerate(shapes)
        ]
        initializers = [
            _GateAndUpHalves(self.kernel_initializer,
                             up_offset=num_layers * self.num_experts)
            if self._gated(layer) else self.kernel_initializer
            for layer in range(num_layers)
        ]
        devices = (
            expert_shards.shard_devices(self.num_experts)
            if self.expert_parallel else None)
        if devices:
            kernels = [
                expert_shards.make_sharded_kernel(
                    self, f"kernel_{layer}",
                    (self.num_experts, fan_in, fan_out),
                    initializers[layer], devices,
                    offset=layer * self.num_experts,
                )
                for layer, (fan_in, fan_out) in enumerate(shapes)
            ]
            # One per replica, of every worker.
            self.num_shards = kernels[0].num_shards
        else:
            kernels = [
                self.add_weight(
                    name=f"kernel_{layer}",
                    shape=(self.num_experts, fan_in, fan_out),
                    # Every expert and every layer draws its own values.
                    initializer=initialization.stacked(
                        initializers[layer],
                        self.num_experts,
                        offset=layer * self.num_experts,
                    ),
                )
                for layer, (fan_in, fan_out) in enumerate(shapes)
            ]
        private_hooks.set_checkpointable_list(self, "kernel", kernels)

    @property
    def kernels(self):
        """`kernels[l]`: layer `l` of every expert, `[num_experts, in, out]`
        (a variable, or with sharded experts a `ShardedKernel`)."""
        return private_hooks.checkpointable_list(
            self, "kernel", len(self.layer_sizes) - 1
        )

    def call(self, inputs, part_sizes=None, training=None):
        x = validation.check_float_tensor("inputs", inputs)
        stacked = part_sizes is None
        validation.check_input_shape(
            "inputs", x.shape, 3 if stacked else 2, 3 if stacked else 2,
            self.layer_sizes[0],
        )
        x = tf.cast(x, self.compute_dtype)
        if stacked and x.shape[0] not in (None, self.num_experts):
            raise ValueError(
                f"3-D `inputs` must hold one slab per expert "
                f"({self.num_experts}). Received: inputs.shape={x.shape}"
            )
        if stacked:
            # Checked when the shape is known: at run time, or when XLA
            # compiles (which drops assertion ops); a batched matmul would
            # broadcast a single slab.
            x = tf.ensure_shape(
                x, [self.num_experts, None, x.shape[2]], name="inputs"
            )
        else:
            part_sizes = validation.check_part_sizes(
                part_sizes, self.num_experts, tf.shape(x)[0]
            )
        if self.num_shards > 1:
            num_replicas, replica_id = all_to_all.replica_layout()
            if num_replicas > 1:
                return self._exchanged_slabs(
                    x, stacked, num_replicas, replica_id, training)
        kernels = [
            tf.cast(kernel, self.compute_dtype) for kernel in self.kernels
        ]
        if stacked:
            # Per-expert matmuls on CPU, batched under XLA or on GPUs.
            return grouped_feed_forward.slab_feed_forward(
                x, kernels, self.between_layers
            )
        return grouped_feed_forward.grouped_feed_forward(
            x, kernels, part_sizes, self.between_layers
        )

    def _exchanged_slabs(self, x, stacked, num_replicas, replica_id,
                         training):
        """Each replica's experts on the slabs every replica holds for them:
        `x [num_experts, capacity, d]` here is this replica's slabs; the
        result, `[num_experts, capacity, output_dim]`, its outputs."""
        if not stacked or num_replicas != self.num_shards:
            raise ValueError(
                "Sharded experts run on slabs `[num_experts, capacity, d]` "
                "(the capacity dispatch), in replica functions of the "
                f"strategy they were built under ({self.num_shards} "
                f"replicas). Received: inputs.shape={tuple(x.shape)}, "
                f"{num_replicas} replicas"
            )
        per_replica = self.num_experts // num_replicas
        capacity, width = tf.shape(x)[1], x.shape[2]
        # Experts [r * E / R, (r + 1) * E / R) live on replica r.
        received = all_to_all.all_to_all(
            tf.reshape(x, [num_replicas, per_replica, capacity, width]))
        # [sender, expert, slot, d] -> [expert, sender and slot, d]
        slabs = tf.reshape(tf.transpose(received, [1, 0, 2, 3]),
                           [per_replica, num_replicas * capacity, width])
        kernels = expert_shards.replica_kernels(self, replica_id, training)
        outputs = grouped_feed_forward.slab_feed_forward(
            slabs, kernels, self.between_layers)
        output_dim = outputs.shape[2]
        back = tf.transpose(
            tf.reshape(outputs,
                       [per_replica, num_replicas, capacity, output_dim]),
            [1, 0, 2, 3])
        returned = all_to_all.all_to_all(back)
        return tf.reshape(returned, [self.num_experts, capacity, output_dim])

    def save_own_variables(self, store):
        if self.num_shards == 1:
            return super().save_own_variables(store)
        # The whole kernels, as the replicated layer saves them.
        for i, kernel in enumerate(self.kernels):
            store[str(i)] = kernel.numpy()

    def load_own_variables(self, store):
        if self.num_shards == 1:
            return super().load_own_variables(store)
        kernels = self.kernels
        if len(store.keys()) != len(kernels):
            raise ValueError(
                f"Layer '{self.name}' expected {len(kernels)} variables, "
                f"but received {len(store.keys())} variables during "
                "loading."
            )
        for i, kernel in enumerate(kernels):
            kernel.assign(store[str(i)])

    def call_expert(self, x, expert_index):
        """Expert `expert_index` (a Python int) alone on `x [m, d]`."""
        validation.check_int(
            "expert_index", expert_index, 0, self.num_experts - 1
        )
        if not self.built:
            raise ValueError(
                "`call_expert` needs a built layer: call it once or call "
                "`build` first."
            )
        x = validation.check_float_tensor("x", x)
        validation.check_input_shape("x", x.shape, 2, 2, self.layer_sizes[0])
        x = tf.cast(x, self.compute_dtype)
        kernels = [
            tf.cast(kernel[expert_index], self.compute_dtype)
            for kernel in self.kernels
        ]
        for layer, kernel in enumerate(kernels):
            x = self.between_layers(layer, tf.matmul(x, kernel))
        return x

    def between_layers(self, layer, z):
        """What follows layer `layer`'s matmul `z`: the original's autoscale
        and, except after the last layer, the hidden activation, or with
        `glu` the gated linear unit of `z`'s two halves (the
        `between_layers` of `grouped_feed_forward`)."""
        fan_in = self.layer_sizes[layer]
        if self.autoscale and fan_in != self.layer_sizes[0]:
            z *= (fan_in / self.layer_sizes[0]) ** -0.5
        if self._gated(layer):
            return grouped_feed_forward.gated_linear_unit(
                z, self.hidden_activation)
        if layer + 2 < len(self.layer_sizes):
            z = self.hidden_activation(z)
        return z

    def _gated(self, layer):
        """Whether layer `layer` is a gated linear unit: with `glu`, every
        layer but the last."""
        return self.glu and layer < len(self.hidden_sizes)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.output_dim or input_shape[-1],)

    def get_config(self):
        base_config = super().get_config()
        config = {
            "num_experts": self.num_experts,
            "output_dim": self.output_dim,
            "hidden_sizes": list(self.hidden_sizes),
            "hidden_activation": keras.activations.serialize(
                self.hidden_activation
            ),
            "autoscale": self.autoscale,
            "kernel_initializer": keras.initializers.serialize(
                self.kernel_initializer
            ),
            "expert_parallel": self.expert_parallel,
            "glu": self.glu,
        }
        return {**base_config, **config}


class _GateAndUpHalves(keras.initializers.Initializer):
    """A gated layer's kernel `[in, 2 * out]` as two matrices `[in, out]`,
    W_gate then W_up, each drawn by `initializer` as its own variable (one
    matrix's fans), W_up with the seed `up_offset` further on.

    Its `seed` is the one W_gate is drawn with, so that
    `initialization.reseeded` (which `initialization.stacked` applies per
    expert) moves both halves' seeds together.
    """

    def __init__(self, initializer, up_offset, seed=None):
        self.initializer = keras.initializers.get(initializer)
        self.up_offset = up_offset
        own_seed = getattr(self.initializer, "seed", None)
        self.seed = own_seed if seed is None else seed

    def __call__(self, shape, dtype=None):
        *rows, width = shape
        half = (*rows, width // 2)
        own_seed = getattr(self.initializer, "seed", None)
        # Without an integer seed `reseeded` returns the initializer as it
        # is, which then draws afresh (or is constant) as it would unsplit.
        offset = (self.seed - own_seed
                  if isinstance(own_seed, int) and isinstance(self.seed, int)
                  else 0)
        gate = initialization.reseeded(self.initializer, offset)
        up = initialization.reseeded(self.initializer,
                                     offset + self.up_offset)
        return tf.concat(
            [gate(half, dtype=dtype), up(half, dtype=dtype)], axis=-1)

    def get_config(self):
        return {
            "initializer": keras.initializers.serialize(self.initializer),
            "up_offset": self.up_offset,
            "seed": self.seed,
        }
