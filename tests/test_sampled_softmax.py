"""SampledSoftmaxLoss: the original `SampledSoftmaxLoss` /
`ParallelSampledSoftmaxLoss`.

Parity with the original (fixed sampled classes -- one of them a target in
every datashard, one drawn twice in a case -- with per-example weights,
over several datashards and class tables sharded in multiples and not: the
per-example losses, the weighted total, and the gradients w.r.t. the class
table and the features) is in tests/test_parity.py (family "softmax").
Here: the formula, inference (full softmax), the samplers, tying to a
ShardedEmbedding, Keras training, serialization and export, mixed precision
and bad input.
"""

import functools
import json
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_moe.embedding import ShardedEmbedding
from keras_moe.sampled_softmax import SampledSoftmaxLoss, sampled_softmax_loss
from numerics import FORWARD, assert_close


# --------------------------------------------------------------------------
# The loss itself.
# --------------------------------------------------------------------------


def _numpy_sampled_loss(x, w, t, sampled, q):
    """The formula, in float64 numpy."""
    x, w = x.astype(np.float64), w.astype(np.float64)
    logq = np.log(q.astype(np.float64))
    sampled_logits = x @ w[sampled].T - logq[sampled]
    target_logits = np.sum(x * w[t], 1) - logq[t]
    terms = [np.append(sampled_logits[b],
                       [] if t[b] in sampled else [target_logits[b]])
             for b in range(len(t))]
    lse = np.array([np.log(np.sum(np.exp(r))) for r in terms])
    return lse - target_logits


def _layer(num_classes=13, width=5, num_shards=3, table_seed=0, **kwargs):
    layer = SampledSoftmaxLoss(num_classes, kwargs.pop("num_sampled", 4),
                               num_shards=num_shards, **kwargs)
    layer.build((None, width))
    rng = np.random.RandomState(table_seed)
    table = rng.normal(size=(num_classes, width)).astype(np.float32)
    layer.embedding.set_full_table(table)
    return layer, table


def test_matches_the_formula_any_rank():
    layer, table = _layer()
    rng = np.random.RandomState(1)
    x = rng.normal(size=(2, 3, 5)).astype(np.float32)
    t = np.array([[0, 12, 5], [5, 7, 1]])
    sampled = np.array([5, 2, 12, 9])
    q = rng.uniform(0.1, 2.0, size=13).astype(np.float32)
    got = layer(x, t, training=True,
                sampled_values=(sampled, q[t], q[sampled]))
    assert got.shape == (2, 3) and got.dtype == tf.float32
    want = _numpy_sampled_loss(x.reshape(-1, 5), table, t.reshape(-1),
                               sampled, q).reshape(2, 3)
    assert_close(got.numpy(), want, FORWARD, what="loss")
    # [..., 1] expected counts of the targets, as the samplers give them.
    got1 = layer(x, t, training=True,
                 sampled_values=(sampled, q[t][..., None], q[sampled]))
    np.testing.assert_array_equal(got1.numpy(), got.numpy())


def test_all_classes_sampled_is_the_full_softmax():
    layer, table = _layer(num_classes=7, num_sampled=7)
    rng = np.random.RandomState(2)
    x = rng.normal(size=(6, 5)).astype(np.float32)
    t = np.array([0, 6, 3, 3, 1, 2])
    sampled = np.arange(7)
    ones = np.ones(7, np.float32)
    got = layer(x, t, training=True, sampled_values=(sampled, ones[t], ones))
    full = layer(x, t, training=False)
    assert_close(got.numpy(), full.numpy(), FORWARD, what="loss")


def test_inference_is_the_full_softmax():
    layer, table = _layer(num_classes=11, num_shards=4)
    rng = np.random.RandomState(3)
    x = rng.normal(size=(2, 4, 5)).astype(np.float32)
    t = rng.randint(0, 11, size=(2, 4))
    logits = x @ table.T
    assert_close(layer.logits(x).numpy(), logits, FORWARD, what="logits")
    log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = -np.take_along_axis(log_softmax, t[..., None], -1)[..., 0]
    for training in (False, None):
        assert_close(layer(x, t, training=training).numpy(), want, FORWARD,
                     what="loss")
    w = rng.uniform(size=(2, 4)).astype(np.float32)
    assert_close(layer(x, t, sample_weight=w).numpy(), want * w, FORWARD,
                 what="weighted loss")


def test_function_matches_the_layer():
    layer, table = _layer()
    rng = np.random.RandomState(4)
    x = rng.normal(size=(4, 5)).astype(np.float32)
    t = np.array([1, 2, 3, 1])
    sampled = np.array([1, 8, 0])
    q = np.full(13, 0.5, np.float32)
    got = sampled_softmax_loss(
        x, t, table[t], np.log(q[t]), sampled, table[sampled],
        np.log(q[sampled]))
    want = layer(x, t, training=True,
                 sampled_values=(sampled, q[t], q[sampled]))
    assert_close(got.numpy(), want.numpy(), FORWARD, what="loss")


def test_gradient_is_sparse_and_finite_with_a_sampled_target():
    layer, _ = _layer()
    x = tf.constant(np.random.RandomState(5).normal(size=(3, 5)), tf.float32)
    t = np.array([4, 4, 9])
    sampled = np.array([4, 9, 0, 1])
    q = np.ones(13, np.float32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(layer(x, t, training=True,
                                   sampled_values=(sampled, q[t], q[sampled])))
    grads = tape.gradient(loss, layer.embedding.shards + [x])
    for g in grads[:-1]:
        assert isinstance(g, tf.IndexedSlices)
        assert np.isfinite(g.values.numpy()).all()
    assert np.isfinite(grads[-1].numpy()).all()


@pytest.mark.parametrize("sampler", ["log_uniform", "uniform",
                                     "learned_unigram"])
def test_samplers(sampler):
    layer, _ = _layer(num_classes=40, num_sampled=6, sampler=sampler, seed=3)
    x = np.random.RandomState(6).normal(size=(8, 5)).astype(np.float32)
    t = np.arange(8) * 5
    with tf.GradientTape() as tape:
        loss = layer(x, t, training=True)
    assert loss.shape == (8,)
    assert np.isfinite(loss.numpy()).all() and (loss.numpy() > 0).all()
    grads = tape.gradient(loss, layer.trainable_variables)
    assert all(g is not None for g in grads)


def test_callable_sampler_and_seed():
    calls = []

    def sampler(true_classes, num_true, num_sampled, unique, range_max,
                seed):
        calls.append(dict(num_true=num_true, num_sampled=num_sampled,
                          unique=unique, range_max=range_max, seed=seed,
                          shape=tuple(true_classes.shape),
                          dtype=true_classes.dtype))
        return tf.random.uniform_candidate_sampler(
            true_classes, num_true, num_sampled, unique, range_max, seed=seed)

    layer, _ = _layer(num_classes=20, num_sampled=5, sampler=sampler,
                      unique=False, seed=9)
    layer(np.zeros((3, 2, 5), np.float32), np.ones((3, 2), np.int32),
          training=True)
    assert calls == [dict(num_true=1, num_sampled=5, unique=False,
                          range_max=20, seed=9, shape=(6, 1),
                          dtype=tf.int64)]
    # A partial of fixed_unigram_candidate_sampler works as a sampler.
    fixed = functools.partial(tf.random.fixed_unigram_candidate_sampler,
                              unigrams=list(range(1, 21)))
    layer2, _ = _layer(num_classes=20, num_sampled=5, sampler=fixed)
    assert layer2(np.zeros((3, 5), np.float32), np.array([1, 2, 3]),
                  training=True).shape == (3,)


def test_seeded_draws_are_reproducible():
    # The sampler's op seed: the same seed gives the same sequence of draws
    # in a fresh graph (as in a fresh process); successive calls differ.
    def with_seed(seed):
        layer = SampledSoftmaxLoss(1000, 50, seed=seed)
        layer.build((None, 5))
        layer.embedding.set_full_table(
            np.random.RandomState(0).normal(size=(1000, 5)).astype("float32"))

        @tf.function
        def step(x, t):
            return layer(x, t, training=True)

        x = np.ones((2, 5), np.float32)
        return [step(x, np.array([1, 2])).numpy() for _ in range(2)]

    a, b = with_seed(17), with_seed(17)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], a[1])  # successive calls differ


def test_tied_embedding():
    emb = ShardedEmbedding(15, 4, 3)
    layer = SampledSoftmaxLoss(15, 5, embedding=emb)
    x = np.random.RandomState(7).normal(size=(3, 4)).astype(np.float32)
    layer(x, np.array([0, 1, 2]))
    assert layer.embedding is emb
    assert [id(v) for v in layer.embedding.shards] == [id(v) for v in
                                                       emb.shards]
    table = emb.full_table().numpy()
    assert_close(layer.logits(x).numpy(), x @ table.T, FORWARD,
                 what="logits")
    with pytest.raises(ValueError, match="features.shape=\\(3, 6\\)"):
        SampledSoftmaxLoss(15, 5, embedding=ShardedEmbedding(15, 4, 3))(
            np.zeros((3, 6), np.float32), np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="embedding.input_dim=14"):
        SampledSoftmaxLoss(15, 5, embedding=ShardedEmbedding(14, 4, 3))
    with pytest.raises(TypeError, match="embedding="):
        SampledSoftmaxLoss(15, 5, embedding=keras.layers.Embedding(15, 4))


@pytest.mark.parametrize("tied", [False, True], ids=["owned", "tied"])
def test_feature_dim_is_the_width_of_the_features(tied):
    """`feature_dim` is the features' width `d` (the class table's
    `output_dim`), not the vocabulary that `input_dim` is on the table."""
    emb = ShardedEmbedding(15, 4, 3) if tied else None
    layer = SampledSoftmaxLoss(15, 5, num_shards=2, embedding=emb)
    assert layer.feature_dim is None  # until built
    layer(np.ones((3, 2, 4), np.float32), np.array([[0, 1]] * 3))
    assert layer.feature_dim == 4 == layer.embedding.output_dim
    assert layer.embedding.input_dim == 15


def test_input_dim_is_a_deprecated_alias_of_feature_dim():
    layer = SampledSoftmaxLoss(15, 5, num_shards=2)
    with pytest.warns(DeprecationWarning, match="use `feature_dim`") as seen:
        assert layer.input_dim is None
    layer, _ = _layer(num_classes=15, width=6)
    with pytest.warns(DeprecationWarning, match="input_dim.*feature_dim"):
        old = layer.input_dim
    assert old == layer.feature_dim == 6
    # The warning points at the caller's line, not into keras_moe.
    assert [w.filename for w in seen] == [__file__]
    # The layer itself reads only the new name: calls, logits and configs
    # warn about nothing.
    x = np.random.RandomState(2).normal(size=(3, 6)).astype(np.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for training in (True, False):
            layer(x, np.array([0, 14, 3]), training=training)
        layer.logits(x)
        config = layer.get_config()
    assert not [w for w in caught if "input_dim" in str(w.message)]
    assert "input_dim" not in config


def test_mixed_precision():
    keras.config.set_dtype_policy("mixed_float16")
    layer = SampledSoftmaxLoss(10, 3, num_shards=2)
    x = np.random.RandomState(8).normal(size=(4, 6)).astype(np.float16)
    for training in (True, False):
        loss = layer(x, np.array([1, 2, 3, 9]), training=training)
        assert loss.dtype == tf.float32
        assert np.isfinite(loss.numpy()).all()
    assert all(v.dtype == "float32" for v in layer.weights)


# --------------------------------------------------------------------------
# Keras training, serialization and export.
# --------------------------------------------------------------------------

VOCAB = 30


def _model():
    ids = keras.Input((None,), dtype="int32", name="ids")
    targets = keras.Input((None,), dtype="int32", name="targets")
    h = ShardedEmbedding(VOCAB, 6, 2, name="emb")(ids)
    h = keras.layers.Dense(6, activation="tanh")(h)
    loss = SampledSoftmaxLoss(VOCAB, 8, num_shards=3, seed=5,
                              name="sampled_softmax")(h, targets)
    return keras.Model([ids, targets], loss)


def _data(n=32, seq=4):
    rng = np.random.RandomState(9)
    return (rng.randint(0, VOCAB, size=(n, seq)).astype(np.int32),
            rng.randint(0, VOCAB, size=(n, seq)).astype(np.int32))


def test_fit_with_the_sampled_loss():
    model = _model()
    model.compile(keras.optimizers.Adam(0.05),
                  loss=lambda y_true, per_token_loss: per_token_loss)
    ids, targets = _data()
    dummy = np.zeros_like(ids, np.float32)
    history = model.fit([ids, targets], dummy, epochs=4, batch_size=8,
                        verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    # evaluate: the full softmax cross-entropy, below that of the uniform
    # prediction the small initial weights start from.
    after = model.evaluate([ids, targets], dummy, verbose=0)
    assert after < np.log(VOCAB) - 0.1


def test_get_config_round_trip():
    layer = SampledSoftmaxLoss(
        20, 6, num_shards=2, sampler="uniform", unique=False, seed=3,
        shard_devices=["/CPU:0", "/CPU:1"], embeddings_initializer="zeros",
        name="ssm")
    config = layer.get_config()
    clone = SampledSoftmaxLoss.from_config(config)
    assert clone.get_config() == config
    tied = SampledSoftmaxLoss(20, 6, embedding=ShardedEmbedding(20, 3, 4))
    config = tied.get_config()
    clone = SampledSoftmaxLoss.from_config(config)
    assert clone.num_shards == 4 and clone.embedding.output_dim == 3
    assert clone.get_config() == config


def test_keras_file_round_trip(tmp_path):
    model = _model()
    ids, targets = _data(4)
    expected = model.predict([ids, targets], verbose=0)
    path = str(tmp_path / "model.keras")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.save(path)
        loaded = keras.saving.load_model(path, safe_mode=True)
    # Keras's saving reads every attribute, but not the deprecated alias.
    assert not [w for w in caught if "input_dim" in str(w.message)]
    layer = loaded.get_layer("sampled_softmax")
    assert isinstance(layer, SampledSoftmaxLoss)
    assert len(layer.embedding.shards) == 3
    np.testing.assert_array_equal(loaded.predict([ids, targets], verbose=0),
                                  expected)


def _tied_model(loss_first):
    """A model whose loss layer reads its classes from the embedding it
    also uses as a layer; `loss_first` puts the loss layer before the
    embedding in `model.layers`."""
    ids = keras.Input((None,), dtype="int32")
    targets = keras.Input((None,), dtype="int32")
    emb = ShardedEmbedding(VOCAB, 6, 3, name="emb")
    loss_layer = SampledSoftmaxLoss(VOCAB, 5, embedding=emb, name="ssm")
    if loss_first:
        features = keras.Input((None, 6))
        model = keras.Model([ids, targets, features],
                            [loss_layer(features, targets), emb(ids)])
    else:
        model = keras.Model([ids, targets],
                            loss_layer(emb(ids), targets))
    emb.set_full_table(np.random.RandomState(3).normal(
        size=(VOCAB, 6)).astype(np.float32))
    return model


@pytest.mark.parametrize("loss_first", [False, True])
def test_tied_model_keras_file_round_trip(tmp_path, loss_first):
    model = _tied_model(loss_first)
    names = [layer.name for layer in model.layers]
    assert (names.index("ssm") < names.index("emb")) == loss_first
    assert len(model.weights) == 3  # one table, used twice
    x, y = _data(4)
    inputs = [x, y] + (
        [np.random.RandomState(4).normal(size=(4, 4, 6)).astype(np.float32)]
        if loss_first else [])
    expected = model.predict(inputs, verbose=0)
    path = str(tmp_path / "tied.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert loaded.get_layer("ssm").embedding is loaded.get_layer("emb")
    assert len(loaded.weights) == 3
    for got, want in zip(loaded.weights, model.weights):
        np.testing.assert_array_equal(got.numpy(), want.numpy())
    for got, want in zip(tf.nest.flatten(loaded.predict(inputs, verbose=0)),
                         tf.nest.flatten(expected)):
        np.testing.assert_array_equal(got, want)


def test_tied_config_outside_a_save_is_plain():
    """Outside a save the tied embedding's config carries no sharing mark,
    so configs of equal layers are equal."""
    config = SampledSoftmaxLoss(
        VOCAB, 5, embedding=ShardedEmbedding(VOCAB, 6, 3)).get_config()
    assert "shared_object_id" not in config["embedding"]
    json.dumps(config)


def test_export_saved_model(tmp_path):
    model = _model()
    ids, targets = _data(4)
    expected = model.predict([ids, targets], verbose=0)
    path = str(tmp_path / "exported")
    model.export(path, verbose=False)
    reloaded = tf.saved_model.load(path)
    got = reloaded.serve([tf.constant(ids), tf.constant(targets)])
    assert_close(got.numpy(), expected, FORWARD, what="serve")


# --------------------------------------------------------------------------
# Bad input.
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(num_classes=0), ValueError, "num_classes=0"),
        (dict(num_sampled=0), ValueError, "num_sampled=0"),
        (dict(num_sampled=11), ValueError, "num_sampled=11"),
        (dict(num_shards=0), ValueError, "num_shards=0"),
        (dict(num_shards=1.5), TypeError, "num_shards=1.5"),
        (dict(sampler="zipf"), ValueError, "sampler='zipf'"),
        (dict(sampler=3), TypeError, "sampler=3"),
        (dict(unique="no"), TypeError, "unique='no'"),
        (dict(seed=-1), ValueError, "seed=-1"),
        (dict(shard_devices=["/CPU:0"], num_shards=2), ValueError,
         "shard_devices="),
    ],
)
def test_bad_arguments(kwargs, error, message):
    args = dict(num_classes=10, num_sampled=3)
    args.update(kwargs)
    with pytest.raises(error, match=message):
        SampledSoftmaxLoss(**args)


@pytest.mark.parametrize("training", [True, False])
def test_bad_inputs(training):
    layer, _ = _layer(num_classes=10)
    x = np.zeros((3, 5), np.float32)
    with pytest.raises(ValueError, match="target_classes contains 10"):
        layer(x, np.array([0, 10, 2]), training=training)
    with pytest.raises(ValueError, match="target_classes contains -1"):
        layer(x, np.array([0, -1, 2]), training=training)
    with pytest.raises(TypeError, match="target_classes.dtype=float"):
        layer(x, np.array([0.0, 1.0, 2.0]), training=training)
    t = np.array([0, 1, 2])
    with pytest.raises(TypeError, match="features.dtype=int"):
        layer(np.zeros((3, 5), np.int32), t, training=training)
    with pytest.raises(ValueError, match=r"features.shape=\(3, 4\)"):
        layer(np.zeros((3, 4), np.float32), t, training=training)
    with pytest.raises(ValueError, match=r"target_classes.shape=\(2,\)"):
        layer(x, np.array([0, 1]), training=training)
    with pytest.raises(ValueError, match=r"sample_weight.shape=\(3, 1\)"):
        layer(x, np.array([0, 1, 2]), training=training,
              sample_weight=np.ones((3, 1), np.float32))


def test_bad_sampled_values():
    layer, _ = _layer(num_classes=10)
    x = np.zeros((3, 5), np.float32)
    t = np.array([0, 1, 2])
    q = np.ones(10, np.float32)
    with pytest.raises(ValueError, match="sampled_values="):
        layer(x, t, training=True, sampled_values=(np.array([1, 2]), q[:3]))
    with pytest.raises(ValueError, match="sampled_values\\[0\\] contains 12"):
        layer(x, t, training=True,
              sampled_values=(np.array([1, 12]), q[:3], q[:2]))
    with pytest.raises(ValueError, match="must be 1-D"):
        layer(x, t, training=True,
              sampled_values=(np.array([[1, 2]]), q[:3], q[:2]))
    with pytest.raises(ValueError, match=r"sampled_values\[1\].shape=\(2,\)"):
        layer(x, t, training=True,
              sampled_values=(np.array([1, 2]), q[:2], q[:2]))
    with pytest.raises(ValueError, match=r"sampled_values\[2\].shape=\(3,\)"):
        layer(x, t, training=True,
              sampled_values=(np.array([1, 2]), q[:3], q[:3]))


@pytest.mark.parametrize("count", [0.0, -1.0, np.nan, np.inf])
@pytest.mark.parametrize("which", [1, 2])
def test_expected_counts_must_be_positive_and_finite(which, count):
    """The logits are corrected by -log(expected count): a zero count made
    the loss NaN or infinite without a word."""
    layer, _ = _layer(num_classes=10)
    x = np.ones((3, 5), np.float32)
    t = np.array([0, 1, 2])
    counts = [None, np.ones(3, np.float32), np.ones(2, np.float32)]
    counts[which][1] = count
    values = (np.array([3, 4]), counts[1], counts[2])
    with pytest.raises(ValueError,
                       match=rf"sampled_values\[{which}\]` must be finite"):
        layer(x, t, training=True, sampled_values=values)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=rf"sampled_values\[{which}\]` must be finite"):
        tf.function(lambda x: layer(x, t, training=True,
                                    sampled_values=values))(tf.constant(x))


def test_custom_sampler_counts_are_checked():
    def sampler(true_classes, num_true, num_sampled, unique, range_max,
                seed):
        sampled, true_expected, sampled_expected = (
            tf.random.uniform_candidate_sampler(
                true_classes, num_true, num_sampled, unique, range_max,
                seed))
        return sampled, true_expected * 0.0, sampled_expected

    layer = SampledSoftmaxLoss(10, 3, sampler=sampler)
    with pytest.raises(ValueError, match="true_expected_count.*finite"):
        layer(np.ones((2, 4), np.float32), np.array([1, 2]), training=True)


def test_ragged_and_unknown_rank_features():
    layer, _ = _layer(num_classes=10)
    t = np.array([0, 1, 2])
    with pytest.raises(TypeError, match="`features` must be a dense tensor"):
        layer(tf.ragged.constant([[[1.0] * 5], [[1.0] * 5] * 2]), t)
    with pytest.raises(ValueError, match="`features` must have a known rank"):
        tf.function(lambda x: layer(x, t),
                    input_signature=[tf.TensorSpec(None)]
                    ).get_concrete_function()


def test_ids_out_of_range_in_graph():
    layer, _ = _layer(num_classes=10)

    @tf.function
    def loss(t):
        return layer(tf.zeros((3, 5)), t, training=True)

    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"target_classes.*must hold ids in \[0, 10\)"):
        loss(tf.constant([1, 10, 2]))
