"""A mod-sharded embedding table: the original `ParallelEmbeddingLookup`
(with its `DistributedSingleDispatcher`) as a Keras layer."""

import keras
import tensorflow as tf

from keras_moe import initialization, private_hooks, validation, xla


def shard_rows(input_dim, num_shards, shard):
    """Rows of shard `shard` of a mod-sharded table of `input_dim` rows.

    Id `i` lives in shard `i % num_shards` at row `i // num_shards`, so shard
    `s` holds the ids `s, s + num_shards, ...` below `input_dim`:
    `ceil((input_dim - s) / num_shards)` of them. When `input_dim` is not a
    multiple of `num_shards` the first `input_dim % num_shards` shards have
    one row more than the others.
    """
    return (input_dim - shard + num_shards - 1) // num_shards


def check_ids(name, ids, input_dim):
    """Converts `ids` to an integer tensor whose values lie in
    `[0, input_dim)`.

    A non-integer dtype is a `TypeError`. Eagerly an id out of range is a
    `ValueError` naming the offending values; inside a graph the check is an
    assertion op that fails the step with an `InvalidArgumentError` carrying
    the same message.
    """
    ids = validation.to_tensor(name, ids)
    if not ids.dtype.is_integer:
        raise TypeError(
            f"`{name}` must be an integer tensor of ids (cast float ids "
            f"yourself, so that nothing is silently truncated). "
            f"Received: {name}.dtype={ids.dtype.name}"
        )
    if ids.dtype in (tf.int64, tf.uint32, tf.uint64):
        ids = tf.cast(ids, tf.int64)
    elif ids.dtype != tf.int32:
        ids = tf.cast(ids, tf.int32)
    if tf.executing_eagerly():
        flat = tf.reshape(ids, [-1])
        bad = tf.boolean_mask(flat, (flat < 0) | (flat >= input_dim))
        count = int(tf.size(bad))
        if count > 0:
            shown = ", ".join(str(v) for v in bad.numpy()[:8].tolist())
            raise ValueError(
                f"`{name}` must hold ids in [0, {input_dim}) "
                f"(0 <= id < input_dim={input_dim}). Received {count} id(s) "
                f"outside it (negative or too large): {name} contains "
                f"{shown}{' ...' if count > 8 else ''}"
            )
        return ids
    message = (
        f"`{name}` must hold ids in [0, {input_dim}) "
        f"(input_dim={input_dim}). Received ids outside it; the smallest "
        f"and largest ids of the batch follow:"
    )
    flat = tf.reshape(ids, [-1])
    empty = tf.equal(tf.size(flat), 0)
    smallest = tf.where(empty, tf.zeros([], ids.dtype), tf.reduce_min(flat))
    largest = tf.where(empty, tf.zeros([], ids.dtype), tf.reduce_max(flat))
    in_range = tf.logical_and(
        smallest >= 0, largest < tf.cast(input_dim, ids.dtype)
    )
    check = tf.debugging.Assert(
        in_range, [message, smallest, largest], summarize=2
    )
    with tf.control_dependencies([check]):
        return tf.identity(ids)


@keras.saving.register_keras_serializable(package="keras_moe")
class ShardedEmbedding(keras.layers.Layer):
    """A mod-sharded embedding table, the original `ParallelEmbeddingLookup`.

    The table of `input_dim` rows is split into `num_shards` variables,
    `shards`: id `i` is row `i // num_shards` of shard `i % num_shards`, so
    shard `s` has `ceil((input_dim - s) / num_shards)` rows (the vocabulary
    need not be a multiple of `num_shards`). A lookup deduplicates the ids
    (`tf.unique`), sends each shard the rows it holds, gathers them where the
    shard lives, and restores the order and repetitions of the ids: each
    distinct row crosses the network once per lookup, and the gradient of a
    shard is an `IndexedSlices` over the rows it gave.

    Placement:

    * `shard_devices`: shard `s` is created under
      `tf.device(shard_devices[s])` (single-process model parallelism, the
      original's parameter devices); lookups gather on those devices.
    * Under `tf.distribute.ParameterServerStrategy` (a custom training loop
      with `tf.distribute.coordinator.ClusterCoordinator`), the strategy
      places each shard on a parameter server, round-robin, so consecutive
      shards land on different servers; lookups gather on the servers. Build
      the layer under `strategy.scope()`, and give the strategy no
      `variable_partitioner` (it would split each shard again, into
      contiguous blocks).
    * Without a strategy (and `shard_devices=None`), and under the other
      strategies, it is a plain layer: the strategy places the shards as it
      places every variable, and `shard_devices` is ignored.

    Each shard is initialized on its own by `embeddings_initializer` with the
    shard's shape (a seeded initializer draws shard `s` with `seed + s`, so
    shards of equal shape differ). The regularizer and the constraint also
    apply shard by shard.

    Args:
        input_dim: int >= 1, the vocabulary size (ids lie in
            `[0, input_dim)`), as in `keras.layers.Embedding`.
        output_dim: int >= 1, the width of an embedding.
        num_shards: int in `[1, input_dim]`, the number of shard variables.
        shard_devices: optional list of `num_shards` device names (or
            `None` entries), where each shard is created.
        embeddings_initializer: initializer of each shard (default
            `"uniform"`, as `keras.layers.Embedding`).
        embeddings_regularizer: optional regularizer, applied to each shard.
        embeddings_constraint: optional constraint, applied to each shard.
        mask_zero: bool, whether id 0 is padding (`compute_mask` is
            `ids != 0`), as in `keras.layers.Embedding`.
        **kwargs: base layer keyword arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: an integer tensor of ids, any shape `[...]`. Ids out of
            range, negative ids and non-integer dtypes are errors.

    Output shape:
        `inputs.shape + (output_dim,)`, in the compute dtype (rows are cast
        after the gather, never the whole table).

    Example:

    >>> emb = ShardedEmbedding(input_dim=10, output_dim=4, num_shards=3)
    >>> emb(np.array([[1, 7, 1], [9, 0, 3]])).shape
    TensorShape([2, 3, 4])
    >>> [tuple(s.shape) for s in emb.shards]
    [(4, 4), (3, 4), (3, 4)]
    """

    def __init__(
        self,
        input_dim,
        output_dim,
        num_shards,
        shard_devices=None,
        embeddings_initializer="uniform",
        embeddings_regularizer=None,
        embeddings_constraint=None,
        mask_zero=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.input_dim = validation.check_int("input_dim", input_dim, 1)
        self.output_dim = validation.check_int("output_dim", output_dim, 1)
        self.num_shards = validation.check_int("num_shards", num_shards, 1)
        if self.num_shards > self.input_dim:
            raise ValueError(
                f"`num_shards` must be at most `input_dim`={self.input_dim} "
                f"(every shard holds at least one id). "
                f"Received: num_shards={self.num_shards}"
            )
        if shard_devices is not None:
            if not isinstance(shard_devices, (list, tuple)) or len(
                shard_devices
            ) != self.num_shards:
                raise ValueError(
                    f"`shard_devices` must be a list of num_shards="
                    f"{self.num_shards} device names. "
                    f"Received: shard_devices={shard_devices!r}"
                )
            for i, device in enumerate(shard_devices):
                if device is not None and not isinstance(device, str):
                    raise TypeError(
                        f"`shard_devices[{i}]` must be a device name (str) "
                        f"or None. Received: shard_devices[{i}]={device!r}"
                    )
            shard_devices = list(shard_devices)
        self.shard_devices = shard_devices
        self.embeddings_initializer = keras.initializers.get(
            embeddings_initializer
        )
        self.embeddings_regularizer = keras.regularizers.get(
            embeddings_regularizer
        )
        self.embeddings_constraint = keras.constraints.get(
            embeddings_constraint
        )
        self.mask_zero = validation.check_bool("mask_zero", mask_zero)
        self.supports_masking = self.mask_zero
        # Shapes depend on the data (tf.unique, tf.dynamic_partition).
        self.supports_jit = False
        # Rows are cast to the compute dtype after the gather; Keras must not
        # autocast the whole table first.
        self.autocast = False

    def build(self, input_shape=None):
        shards = []
        for s in range(self.num_shards):
            device = self.shard_devices[s] if self.shard_devices else None
            with tf.device(device):
                shards.append(
                    self.add_weight(
                        name=f"shard_{s}",
                        shape=(
                            shard_rows(self.input_dim, self.num_shards, s),
                            self.output_dim,
                        ),
                        # Each shard its own draw from a seeded
                        # initializer, not the same values again.
                        initializer=initialization.reseeded(
                            self.embeddings_initializer, s
                        ),
                        regularizer=self.embeddings_regularizer,
                        constraint=self.embeddings_constraint,
                        autocast=False,
                    )
                )
        private_hooks.set_checkpointable_list(self, "shard", shards)

    def __call__(self, inputs, *args, **kwargs):
        # Ids of any shape, of unknown rank too: the table does not depend
        # on them, but Keras reads their shape to build the layer.
        shape = getattr(inputs, "shape", None)
        if not self.built and isinstance(shape, tf.TensorShape) and (
            shape.rank is None
        ):
            self.build()
            self.built = True
        return super().__call__(inputs, *args, **kwargs)

    @property
    def shards(self):
        """The `num_shards` shard variables (None before `build`)."""
        if not hasattr(self, "shard_0"):
            return None
        return private_hooks.checkpointable_list(
            self, "shard", self.num_shards
        )

    def shard_values(self):
        """The shards as TensorFlow values (variables when they are), to
        gather from without reading whole shards."""
        return [shard.value for shard in self.shards]

    def lookup(self, ids):
        """The rows of `ids` (an integer tensor `[...]`), `[..., output_dim]`
        in the variables' dtype, without the range check of `call`."""
        xla.check_not_xla(
            "ShardedEmbedding's lookup (tf.unique, tf.dynamic_partition)",
            "Call it without `jit_compile=True` (`keras.layers.Embedding` "
            "compiles).",
        )
        ids_shape = tf.shape(ids, out_type=ids.dtype)
        flat = tf.reshape(ids, [-1])
        unique_ids, unique_index = tf.unique(flat, out_idx=ids.dtype)
        rows = gather_rows(self.shard_values(), unique_ids)
        out = tf.gather(rows, unique_index)
        out = tf.reshape(
            out,
            tf.concat(
                [ids_shape, tf.constant([self.output_dim], ids.dtype)], 0
            ),
        )
        return tf.ensure_shape(out, ids.shape.concatenate([self.output_dim]))

    def call(self, inputs):
        ids = check_ids("inputs", inputs, self.input_dim)
        out = self.lookup(ids)
        return tf.cast(out, self.compute_dtype)

    def full_table(self):
        """The whole table `[input_dim, output_dim]`, rows in id order.

        Builds a copy of every shard on the caller's device: for inspection,
        export or small vocabularies.
        """
        n = self.num_shards
        indices = [tf.range(s, self.input_dim, n) for s in range(n)]
        return tf.dynamic_stitch(indices, self.shard_values())

    def set_full_table(self, table):
        """Assigns the shards from a whole table `[input_dim, output_dim]`
        (rows in id order)."""
        table = validation.to_tensor("table", table)
        if tuple(table.shape) != (self.input_dim, self.output_dim):
            raise ValueError(
                f"`table` must have shape (input_dim, output_dim) = "
                f"{(self.input_dim, self.output_dim)}. "
                f"Received: table.shape={tuple(table.shape)}"
            )
        if not self.built:
            self.build()
        for s, shard in enumerate(self.shards):
            shard.assign(tf.cast(table[s :: self.num_shards], shard.dtype))

    def compute_mask(self, inputs, mask=None):
        if not self.mask_zero:
            return None
        # keras.ops, not tf: Keras calls this on symbolic inputs too.
        return keras.ops.not_equal(inputs, 0)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape) + (self.output_dim,)

    def compute_output_spec(self, inputs):
        return keras.KerasTensor(
            self.compute_output_shape(inputs.shape), dtype=self.compute_dtype
        )

    def get_config(self):
        base_config = super().get_config()
        config = {
            "input_dim": self.input_dim,
            "output_dim": self.output_dim,
            "num_shards": self.num_shards,
            "shard_devices": self.shard_devices,
            "embeddings_initializer": keras.initializers.serialize(
                self.embeddings_initializer
            ),
            "embeddings_regularizer": keras.regularizers.serialize(
                self.embeddings_regularizer
            ),
            "embeddings_constraint": keras.constraints.serialize(
                self.embeddings_constraint
            ),
            "mask_zero": self.mask_zero,
        }
        return {**base_config, **config}


def gather_rows(shards, ids):
    """Rows `ids` (distinct, 1-D, in range) of the mod-sharded table
    `shards`, `[len(ids), width]`.

    The original's `DistributedSingleDispatcher`: ids are partitioned by
    shard (`id % n`), each shard gathers its rows (`id // n`) on its own
    device, and the rows are stitched back into the order of `ids`.
    """
    n = len(shards)
    if n == 1:
        return tf.gather(shards[0], ids)
    shard_index = tf.cast(ids % n, tf.int32)
    rows = ids // n
    positions = tf.range(tf.size(ids))
    parts = tf.dynamic_partition(rows, shard_index, n)
    stitch = tf.dynamic_partition(positions, shard_index, n)
    gathered = []
    for shard, part in zip(shards, parts):
        with tf.device(shard.device):
            gathered.append(tf.gather(shard, part))
    return tf.dynamic_stitch(stitch, gathered)
