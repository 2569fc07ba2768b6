"""Sampled softmax over a large vocabulary: the original
`SampledSoftmaxLoss` and `ParallelSampledSoftmaxLoss` as a Keras layer that
reads its class weights from a `ShardedEmbedding`."""

import warnings

import keras
import tensorflow as tf

from keras_moe import validation
from keras_moe.embedding import ShardedEmbedding, check_ids

# The TensorFlow candidate samplers a `sampler` string names. Each is called
# as sampler(true_classes=[N, 1] int64, num_true=1, num_sampled=...,
# unique=..., range_max=num_classes, seed=...) and returns
# (sampled_candidates [S], true_expected_count [N, 1],
# sampled_expected_count [S]).
SAMPLERS = {
    "log_uniform": tf.random.log_uniform_candidate_sampler,
    "uniform": tf.random.uniform_candidate_sampler,
    "learned_unigram": tf.random.learned_unigram_candidate_sampler,
}


def sampled_softmax_loss(
    features,
    target_classes,
    target_weights,
    target_log_expected_count,
    sampled_classes,
    sampled_weights,
    sampled_log_expected_count,
):
    """Per-example sampled-softmax loss, the original `SampledSoftmaxLoss`.

    Each logit is `features . weights - log(expected_count)` (the sampler's
    correction). The loss of example `b` is
    `logsumexp({sampled logits of b} + {target logit of b}) - target logit`,
    where the target's own term is dropped (an `-inf` mask) when the target
    is among the sampled classes, since it is in the sum already.

    Args:
        features: float `[batch, d]`.
        target_classes: int `[batch]`.
        target_weights: float `[batch, d]`, the weights of the targets.
        target_log_expected_count: float `[batch]`.
        sampled_classes: int `[num_sampled]`, shared by the batch.
        sampled_weights: float `[num_sampled, d]`.
        sampled_log_expected_count: float `[num_sampled]`.

    Returns:
        float `[batch]`.
    """
    # Corrected logits: [batch, num_sampled] and [batch].
    logits_s = tf.matmul(features, sampled_weights, transpose_b=True)
    logits_s = logits_s - sampled_log_expected_count
    logits_t = tf.reduce_sum(features * target_weights, axis=1)
    logits_t = logits_t - target_log_expected_count
    # Is each example's target among the sampled classes? (A comparison,
    # [batch, num_sampled], rather than a [num_classes] mask.)
    hit = tf.reduce_any(
        tf.equal(
            tf.cast(target_classes, tf.int64)[:, None],
            tf.cast(sampled_classes, tf.int64)[None, :],
        ),
        axis=1,
    )
    # The target's own term of the denominator, -inf when it is a sampled
    # class already; then logsumexp(logsumexp(sampled), target term).
    minus_inf = tf.fill(tf.shape(logits_t), float("-inf"))
    term_t = tf.where(hit, minus_inf, logits_t)
    lse_s = tf.reduce_logsumexp(logits_s, axis=1)
    lse = tf.reduce_logsumexp(tf.stack([lse_s, term_t]), axis=0)
    return lse - logits_t


@keras.saving.register_keras_serializable(package="keras_moe")
class SampledSoftmaxLoss(keras.layers.Layer):
    """Sampled-softmax loss over `num_classes` classes whose weights live in
    a mod-sharded `ShardedEmbedding`.

    The original `SampledSoftmaxLoss` / `ParallelSampledSoftmaxLoss` of
    Shazeer et al. (2017). In training, each call draws `num_sampled`
    classes shared by the whole batch from a candidate sampler, gathers the
    rows of the target and sampled classes from the sharded table (each
    shard on its own device or parameter server; only the rows travel), and
    returns, per example,
    `logsumexp(sampled logits, target logit) - target logit`, every logit
    corrected by `- log(expected_count)` of the sampler, and the target's
    own term dropped when the target was also sampled (the original's
    `-inf` mask; unlike `tf.nn.sampled_softmax_loss`, which drops the
    sampled copy instead, "accidental hits"). There are no biases, as in the
    original. In inference (`training` false or `None`) it returns the full
    softmax cross-entropy over all `num_classes` (see `logits`).

    Sampling. `sampler` is `"log_uniform"` (the default,
    `tf.random.log_uniform_candidate_sampler`: class ids ordered by
    decreasing frequency), `"uniform"`, `"learned_unigram"`, or any
    callable with the signature of TensorFlow's candidate samplers,
    `fn(true_classes, num_true, num_sampled, unique, range_max, seed)`
    returning `(sampled_candidates, true_expected_count,
    sampled_expected_count)` (e.g. a `functools.partial` of
    `tf.random.fixed_unigram_candidate_sampler`). TensorFlow's candidate
    samplers are stateful ops seeded by integers at graph-building time, so
    they cannot draw from a `keras.random.SeedGenerator`: `seed` is passed
    to the sampler as its op seed. With a seed (or a global seed, e.g.
    `keras.utils.set_random_seed`) the sequence of draws is reproducible
    from one run to the next, and successive calls still differ. To replay
    or fix the draw, pass `sampled_values`. Under `MirroredStrategy` with a
    `seed` every replica draws the same classes.

    Args:
        num_classes: int >= 1, the vocabulary of the targets.
        num_sampled: int in `[1, num_classes]`, classes drawn per call
            (distinct when `unique`).
        num_shards: int, the shards of the class table (default 1); ignored
            when `embedding` is given.
        sampler: a sampler name or callable, see above.
        unique: bool, whether the sampled classes are distinct (default
            true, as `tf.nn.sampled_softmax_loss`).
        seed: optional int >= 0, the sampler's op seed.
        shard_devices: optional list of `num_shards` devices for the owned
            table (see `ShardedEmbedding`).
        embeddings_initializer: initializer of the owned table.
        embedding: optional `ShardedEmbedding` with `input_dim ==
            num_classes` (its vocabulary) to read the class weights from
            instead of owning a table, e.g. the input embedding, to tie them
            (its `output_dim` must be the features' width). In a model
            that also uses the embedding as a layer, the tie survives a
            `.keras` round trip (Keras restores a shared object once).
        **kwargs: base layer keyword arguments (`name`, `dtype`, ...).

    Attributes:
        feature_dim: the width `d` of `features`, which is the class
            table's `output_dim`; `None` until built. (Formerly
            `input_dim`, a deprecated alias now: `input_dim` of a
            `ShardedEmbedding` is its vocabulary size.)

    Call arguments:
        features: float `[..., d]`, `d` = `feature_dim`.
        target_classes: integer `[...]`, ids in `[0, num_classes)`.
        training: Python bool; sampled loss when true, full softmax
            otherwise.
        sample_weight: optional float `[...]`, multiplies the loss of each
            example (the original's `target_weights`).
        sampled_values: optional tuple `(sampled_classes [S],
            true_expected_count [...] or [..., 1], sampled_expected_count
            [S])`, the output of a candidate sampler, used instead of a
            fresh draw in training (inference uses every class and ignores
            it). The expected counts must be finite and > 0 (the logits are
            corrected by their log).

    Returns:
        The per-example loss, float32 `[...]` (sum it for the original's
        `ParallelSampledSoftmaxLoss`, or average it).

    Example:

    >>> loss_layer = SampledSoftmaxLoss(num_classes=50, num_sampled=8,
    ...                                 num_shards=2)
    >>> features = np.random.rand(4, 6).astype("float32")
    >>> targets = np.array([3, 0, 49, 3])
    >>> loss_layer(features, targets, training=True).shape
    TensorShape([4])
    >>> loss_layer(features, targets).shape  # full softmax in inference
    TensorShape([4])
    >>> loss_layer.logits(features).shape
    TensorShape([4, 50])
    >>> loss_layer.feature_dim
    6
    """

    def __init__(
        self,
        num_classes,
        num_sampled,
        num_shards=1,
        sampler="log_uniform",
        unique=True,
        seed=None,
        shard_devices=None,
        embeddings_initializer="uniform",
        embedding=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_classes = validation.check_int("num_classes", num_classes, 1)
        self.num_sampled = validation.check_int(
            "num_sampled", num_sampled, 1, self.num_classes
        )
        self.unique = validation.check_bool("unique", unique)
        if isinstance(sampler, str):
            if sampler not in SAMPLERS:
                raise ValueError(
                    f"`sampler` must be one of {sorted(SAMPLERS)} or a "
                    f"callable candidate sampler. "
                    f"Received: sampler={sampler!r}"
                )
        elif isinstance(sampler, dict):
            sampler = keras.saving.deserialize_keras_object(sampler)
        if not isinstance(sampler, str) and not callable(sampler):
            raise TypeError(
                f"`sampler` must be a sampler name or a callable. "
                f"Received: sampler={sampler!r}"
            )
        self.sampler = sampler
        if seed is not None:
            validation.check_int("seed", seed, 0)
        self.seed = seed
        self.embeddings_initializer = keras.initializers.get(
            embeddings_initializer
        )
        if isinstance(embedding, dict):
            embedding = keras.saving.deserialize_keras_object(embedding)
        if embedding is not None:
            if not isinstance(embedding, ShardedEmbedding):
                raise TypeError(
                    f"`embedding` must be a ShardedEmbedding. "
                    f"Received: embedding={embedding!r}"
                )
            if embedding.input_dim != self.num_classes:
                raise ValueError(
                    f"`embedding.input_dim` must equal num_classes="
                    f"{self.num_classes}. Received: "
                    f"embedding.input_dim={embedding.input_dim}"
                )
            self._owns_embedding = False
            self.num_shards = embedding.num_shards
            self.shard_devices = embedding.shard_devices
        else:
            self._owns_embedding = True
            self.num_shards = validation.check_int(
                "num_shards", num_shards, 1, self.num_classes
            )
            # Checked again by the table; checked here to fail early.
            if shard_devices is not None and (
                not isinstance(shard_devices, (list, tuple))
                or len(shard_devices) != self.num_shards
            ):
                raise ValueError(
                    f"`shard_devices` must be a list of num_shards="
                    f"{self.num_shards} device names. "
                    f"Received: shard_devices={shard_devices!r}"
                )
            self.shard_devices = (
                list(shard_devices) if shard_devices is not None else None
            )
        self.embedding = embedding
        self.supports_jit = False
        # The loss is float32 under every dtype policy; features and rows are
        # cast here, after the gather.
        self.autocast = False

    def build(self, features_shape):
        validation.check_input_shape("features", features_shape, 2)
        width = features_shape[-1]
        if self.embedding is None:
            self.embedding = ShardedEmbedding(
                self.num_classes,
                width,
                self.num_shards,
                shard_devices=self.shard_devices,
                embeddings_initializer=self.embeddings_initializer,
                dtype=self.dtype_policy,
                name="class_embedding",
            )
        elif self.embedding.output_dim != width:
            raise ValueError(
                f"The last axis of `features` must have size "
                f"embedding.output_dim={self.embedding.output_dim}. "
                f"Received: features.shape={tuple(features_shape)}"
            )
        if not self.embedding.built:
            self.embedding.build()

    def __call__(self, features, *args, **kwargs):
        validation.check_known_rank("features", features)
        return super().__call__(features, *args, **kwargs)

    @property
    def feature_dim(self):
        """The width `d` of `features` (the class table's `output_dim`);
        `None` until the layer is built."""
        return self.embedding.output_dim if self.built else None

    @property
    def input_dim(self):
        """Deprecated alias of `feature_dim`."""
        # Renamed: on a `ShardedEmbedding` (and `keras.layers.Embedding`)
        # `input_dim` is the vocabulary size, here it was the feature width.
        warnings.warn(
            "`SampledSoftmaxLoss.input_dim` is deprecated; use `feature_dim` "
            "(the width of `features`). (`input_dim` of a `ShardedEmbedding` "
            "is its vocabulary size.)",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.feature_dim

    def __dir__(self):
        # Keras's saving reads every attribute `dir()` lists: leaving the
        # deprecated alias out keeps its warning for code that names it.
        return [name for name in super().__dir__() if name != "input_dim"]

    def _sample(self, flat_targets):
        sampler = SAMPLERS.get(self.sampler, self.sampler)
        sampled, true_expected, sampled_expected = sampler(
            true_classes=tf.expand_dims(tf.cast(flat_targets, tf.int64), 1),
            num_true=1,
            num_sampled=self.num_sampled,
            unique=self.unique,
            range_max=self.num_classes,
            seed=self.seed,
        )
        if not isinstance(self.sampler, str):
            # A custom sampler's counts are checked as given ones are.
            true_expected = validation.check_finite_positive(
                "sampler(...)[1] (true_expected_count)",
                validation.check_float_tensor(
                    "sampler(...)[1] (true_expected_count)", true_expected),
            )
            sampled_expected = validation.check_finite_positive(
                "sampler(...)[2] (sampled_expected_count)",
                validation.check_float_tensor(
                    "sampler(...)[2] (sampled_expected_count)",
                    sampled_expected),
            )
        return sampled, tf.reshape(true_expected, [-1]), sampled_expected

    def _fixed_sample(self, sampled_values, target_classes):
        if not isinstance(sampled_values, (list, tuple)) or len(
            sampled_values
        ) != 3:
            raise ValueError(
                "`sampled_values` must be a tuple (sampled_classes, "
                "true_expected_count, sampled_expected_count). "
                f"Received: sampled_values={sampled_values!r}"
            )
        sampled, true_expected, sampled_expected = sampled_values
        sampled = check_ids(
            "sampled_values[0]", sampled, self.num_classes
        )
        if sampled.shape.rank != 1:
            raise ValueError(
                "`sampled_values[0]` (the sampled classes) must be 1-D. "
                f"Received: shape={tuple(sampled.shape)}"
            )
        true_expected = validation.check_float_tensor(
            "sampled_values[1]", true_expected
        )
        if true_expected.shape.rank == target_classes.shape.rank + 1:
            true_expected = validation.check_leading_shape(
                "sampled_values[1]", true_expected,
                tf.expand_dims(target_classes, -1), "target_classes", (1,),
            )
        else:
            true_expected = validation.check_leading_shape(
                "sampled_values[1]", true_expected,
                tf.expand_dims(target_classes, -1), "target_classes",
            )
        sampled_expected = validation.check_float_tensor(
            "sampled_values[2]", sampled_expected
        )
        sampled_expected = validation.check_leading_shape(
            "sampled_values[2]", sampled_expected,
            tf.expand_dims(sampled, -1), "sampled_values[0]",
        )
        # The logits are corrected by -log(expected count): a count of 0
        # (or less, or NaN) would make the loss NaN or infinite.
        true_expected = validation.check_finite_positive(
            "sampled_values[1]", true_expected
        )
        sampled_expected = validation.check_finite_positive(
            "sampled_values[2]", sampled_expected
        )
        return sampled, tf.reshape(true_expected, [-1]), sampled_expected

    def call(
        self,
        features,
        target_classes,
        training=None,
        sample_weight=None,
        sampled_values=None,
    ):
        features = validation.check_float_tensor("features", features)
        validation.check_input_shape(
            "features", features.shape, 2, None, self.feature_dim
        )
        targets = check_ids("target_classes", target_classes, self.num_classes)
        targets = validation.check_leading_shape(
            "target_classes", targets, features, "features"
        )
        x = tf.reshape(tf.cast(features, tf.float32), [-1, self.feature_dim])
        t = tf.reshape(targets, [-1])
        if training:
            if sampled_values is None:
                sampled, true_expected, sampled_expected = self._sample(t)
            else:
                sampled, true_expected, sampled_expected = self._fixed_sample(
                    sampled_values, targets
                )
            sampled = tf.stop_gradient(tf.cast(sampled, t.dtype))
            log_true = tf.math.log(
                tf.stop_gradient(tf.cast(true_expected, tf.float32))
            )
            log_sampled = tf.math.log(
                tf.stop_gradient(tf.cast(sampled_expected, tf.float32))
            )
            # One lookup for both: each distinct row is fetched once.
            rows = tf.cast(
                self.embedding.lookup(tf.concat([t, sampled], 0)), tf.float32
            )
            num_targets = tf.size(t)
            loss = sampled_softmax_loss(
                x,
                t,
                rows[:num_targets],
                log_true,
                sampled,
                rows[num_targets:],
                log_sampled,
            )
        else:
            loss = tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels=t, logits=self._flat_logits(x)
            )
        if sample_weight is not None:
            sample_weight = validation.check_float_tensor(
                "sample_weight", sample_weight
            )
            sample_weight = validation.check_leading_shape(
                "sample_weight", sample_weight, features, "features"
            )
            loss = loss * tf.reshape(tf.cast(sample_weight, tf.float32), [-1])
        loss = tf.reshape(loss, tf.shape(targets))
        return tf.ensure_shape(loss, features.shape[:-1])

    def _flat_logits(self, x):
        """Full logits `[N, num_classes]` of float32 `x [N, d]`: one matmul
        per shard, on the shard's device, then the columns in class order."""
        shards = self.embedding.shard_values()
        n = len(shards)
        parts = []
        for shard in shards:
            with tf.device(shard.device):
                parts.append(
                    tf.matmul(x, tf.cast(shard, tf.float32), transpose_b=True)
                )
        if n == 1:
            return parts[0]
        logits = tf.concat(parts, 1)
        # Class c is column c // n of shard c % n, i.e. column
        # offset[c % n] + c // n of the concatenation.
        sizes = [int(shard.shape[0]) for shard in shards]
        offsets = tf.constant([sum(sizes[:s]) for s in range(n)], tf.int32)
        classes = tf.range(self.num_classes)
        order = tf.gather(offsets, classes % n) + classes // n
        return tf.gather(logits, order, axis=1)

    def logits(self, features):
        """Full-softmax logits `[..., num_classes]` (float32) of `features
        [..., d]`, for prediction and decoding."""
        features = validation.check_float_tensor("features", features)
        if not self.built:
            self.build(features.shape)
        validation.check_input_shape(
            "features", features.shape, 2, None, self.feature_dim
        )
        x = tf.reshape(tf.cast(features, tf.float32), [-1, self.feature_dim])
        out = tf.reshape(
            self._flat_logits(x),
            tf.concat([tf.shape(features)[:-1], [self.num_classes]], 0),
        )
        return tf.ensure_shape(
            out, features.shape[:-1].concatenate([self.num_classes])
        )

    def compute_output_shape(self, features_shape, *args, **kwargs):
        return tuple(features_shape[:-1])

    def compute_output_spec(
        self,
        features,
        target_classes,
        training=None,
        sample_weight=None,
        sampled_values=None,
    ):
        return keras.KerasTensor(tuple(features.shape[:-1]), dtype="float32")

    def get_config(self):
        base_config = super().get_config()
        sampler = self.sampler
        if not isinstance(sampler, str):
            sampler = keras.saving.serialize_keras_object(sampler)
        config = {
            "num_classes": self.num_classes,
            "num_sampled": self.num_sampled,
            "num_shards": self.num_shards,
            "sampler": sampler,
            "unique": self.unique,
            "seed": self.seed,
            "shard_devices": self.shard_devices,
            "embeddings_initializer": keras.initializers.serialize(
                self.embeddings_initializer
            ),
            "embedding": (
                None if self._owns_embedding
                else shared_layer_config(self.embedding)
            ),
        }
        return {**base_config, **config}


def shared_layer_config(layer):
    """The serialized config of a layer held by another layer that does not
    own it (a tied `embedding`), marked as shared when saved with a model.

    While saving a model, Keras restores an object it meets twice once, by
    a `shared_object_id` it writes into each copy of the object's config.
    It adds the id to the first copy when it meets the second, but by then
    it has copied the config returned here into the holder's config: when
    the holder comes before the held layer in `model.layers`, the saved copy
    would lack the id, and the loader would build the held layer twice
    (untied) and look for its weights where the holder saved them.
    Serialized twice here, the layer comes back already marked (within a
    save; outside one Keras shares nothing and the config is the plain one).
    """
    keras.saving.serialize_keras_object(layer)
    return keras.saving.serialize_keras_object(layer)
