"""ShardedEmbedding: the original `ParallelEmbeddingLookup`.

Parity with the original (lookups for vocabularies that are and are not
multiples of the shard count, over several datashards with repeated ids,
and the gradient w.r.t. the table) is in tests/test_parity.py (family
"embedding"). Here: the shard layout, dedup and placement, any input rank,
strategies, serialization and SavedModel export, mixed precision, and bad
input.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_moe.embedding import ShardedEmbedding, shard_rows
from strategies import mirrored
from numerics import FORWARD, assert_close


# --------------------------------------------------------------------------
# Layout, lookup, dedup.
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "input_dim, num_shards, rows",
    [(12, 3, [4, 4, 4]), (10, 3, [4, 3, 3]), (11, 4, [3, 3, 3, 2]),
     (5, 5, [1, 1, 1, 1, 1]), (7, 1, [7])],
)
def test_shard_shapes(input_dim, num_shards, rows):
    layer = ShardedEmbedding(input_dim, 2, num_shards)
    layer.build()
    assert [tuple(s.shape) for s in layer.shards] == [(r, 2) for r in rows]
    assert [shard_rows(input_dim, num_shards, s)
            for s in range(num_shards)] == rows
    assert [v.name for v in layer.weights] == [
        f"shard_{s}" for s in range(num_shards)]


@pytest.mark.parametrize("input_dim, num_shards", [(12, 3), (10, 3), (11, 4)])
def test_id_i_is_row_i_div_n_of_shard_i_mod_n(input_dim, num_shards):
    # Answers the original's TODO: a vocabulary that is not a multiple of
    # the shard count works, every id reaches its own row.
    table = np.arange(input_dim * 3, dtype=np.float32).reshape(input_dim, 3)
    layer = ShardedEmbedding(input_dim, 3, num_shards)
    layer.set_full_table(table)
    for i in range(input_dim):
        shard = layer.shards[i % num_shards].numpy()
        np.testing.assert_array_equal(shard[i // num_shards], table[i])
    ids = np.arange(input_dim)[::-1]
    np.testing.assert_array_equal(layer(ids).numpy(), table[ids])
    np.testing.assert_array_equal(layer.full_table().numpy(), table)


@pytest.mark.parametrize(
    "shape", [(), (0,), (5,), (2, 3), (2, 0, 4), (2, 3, 4, 2)]
)
def test_any_rank(shape):
    rng = np.random.RandomState(0)
    table = rng.normal(size=(9, 4)).astype(np.float32)
    layer = ShardedEmbedding(9, 4, 2)
    layer.set_full_table(table)
    ids = rng.randint(0, 9, size=shape)
    out = layer(ids)
    assert tuple(out.shape) == shape + (4,)
    np.testing.assert_array_equal(out.numpy(), table[ids])
    assert layer.compute_output_shape(shape) == shape + (4,)


def test_int64_and_small_int_ids():
    layer = ShardedEmbedding(9, 4, 3)
    layer.build()
    table = layer.full_table().numpy()
    ids = np.array([[8, 0], [3, 3]])
    for dtype in (np.int64, np.int32, np.int16, np.uint8):
        np.testing.assert_array_equal(layer(ids.astype(dtype)).numpy(),
                                      table[ids])


def test_lookup_dedups_and_gathers_only_rows():
    layer = ShardedEmbedding(20, 4, 2)
    layer.build()

    @tf.function
    def lookup(ids):
        return layer(ids)

    graph = lookup.get_concrete_function(
        tf.TensorSpec([None, None], tf.int32)).graph
    types = [op.type for op in graph.get_operations()]
    assert "Unique" in types
    # Each shard gathers its rows where it lives (ResourceGather); no shard
    # is read whole.
    assert types.count("ResourceGather") == 2
    assert "ReadVariableOp" not in types
    # Ids repeat 50 times each: the shards still see each row once.
    with tf.GradientTape() as tape:
        out = layer(np.tile([3, 4, 3, 17], 50))
    grads = tape.gradient(out, layer.shards)
    assert all(isinstance(g, tf.IndexedSlices) for g in grads)
    assert sorted(int(i) for i in grads[0].indices) == [2]
    assert sorted(int(i) for i in grads[1].indices) == [1, 8]
    np.testing.assert_array_equal(grads[1].values.numpy()[0], [100.0] * 4)


def test_seeded_initializer_draws_each_shard():
    init = keras.initializers.RandomNormal(seed=7)
    a = ShardedEmbedding(12, 3, 3, embeddings_initializer=init)
    b = ShardedEmbedding(12, 3, 3, embeddings_initializer=init)
    a.build()
    b.build()
    values = [s.numpy() for s in a.shards]
    assert not np.array_equal(values[0], values[1])
    assert not np.array_equal(values[1], values[2])
    for x, y in zip(a.shards, b.shards):  # and reproducibly so
        np.testing.assert_array_equal(x.numpy(), y.numpy())
    default = ShardedEmbedding(12, 3, 3)  # "uniform"
    default.build()
    assert not np.array_equal(default.shards[0].numpy(),
                              default.shards[1].numpy())


def test_mask_zero():
    layer = ShardedEmbedding(6, 2, 2, mask_zero=True)
    ids = np.array([[1, 0, 5], [0, 0, 2]])
    np.testing.assert_array_equal(layer.compute_mask(ids).numpy(), ids != 0)
    assert ShardedEmbedding(6, 2, 2).compute_mask(ids) is None


def test_mask_zero_in_a_functional_model():
    ids = keras.Input((None,), dtype="int32")
    h = ShardedEmbedding(6, 2, 2, mask_zero=True)(ids)
    assert h._keras_mask is not None
    # The mask reaches the next layer: a masked average ignores padding.
    pooled = keras.layers.GlobalAveragePooling1D()(h)
    layer = keras.Model(ids, [h, pooled])
    batch = np.array([[1, 3, 0, 0], [2, 0, 0, 0]])
    rows, means = layer(batch)
    assert_close(means[0], rows.numpy()[0, :2].mean(0), FORWARD,
                 what="masked mean")
    assert_close(means[1], rows.numpy()[1, 0], FORWARD, what="masked mean")


def test_tf_train_checkpoint_holds_every_shard(tmp_path):
    layer = ShardedEmbedding(7, 3, 3)
    layer.build()
    path = tf.train.Checkpoint(layer=layer).save(str(tmp_path / "ckpt"))
    restored = ShardedEmbedding(7, 3, 3, embeddings_initializer="zeros")
    restored.build()
    tf.train.Checkpoint(layer=restored).restore(path).assert_consumed()
    for saved, loaded in zip(layer.shards, restored.shards):
        np.testing.assert_array_equal(saved.numpy(), loaded.numpy())


def test_mixed_precision():
    layer = ShardedEmbedding(7, 3, 2, dtype="mixed_float16")
    out = layer(np.array([1, 6]))
    assert out.dtype == tf.float16
    assert all(s.dtype == "float32" for s in layer.shards)


# --------------------------------------------------------------------------
# Placement and strategies.
# --------------------------------------------------------------------------


def test_shard_devices():
    devices = ["/CPU:1", "/CPU:2", None]
    layer = ShardedEmbedding(10, 3, 3, shard_devices=devices)
    layer.build()
    placed = [s.value.device for s in layer.shards]
    assert placed[0].endswith("device:CPU:1"), placed
    assert placed[1].endswith("device:CPU:2"), placed
    assert placed[2].endswith("device:CPU:0"), placed
    table = layer.full_table().numpy()
    ids = np.array([9, 1, 5, 1, 0])
    np.testing.assert_array_equal(layer(ids).numpy(), table[ids])

    @tf.function
    def lookup(ids):
        return layer(ids)

    graph = lookup.get_concrete_function(tf.TensorSpec([None], tf.int32)).graph
    gathers = [op for op in graph.get_operations()
               if op.type == "ResourceGather"]
    assert sorted(op.device[-5:] for op in gathers) == [
        "CPU:0", "CPU:1", "CPU:2"]
    np.testing.assert_array_equal(lookup(ids).numpy(), table[ids])
    # Built by its first call inside a tf.function: the same placement.
    late = ShardedEmbedding(10, 3, 3, shard_devices=devices)
    tf.function(late)(tf.constant([1, 2]))
    assert [s.value.device[-5:] for s in late.shards] == [
        "CPU:1", "CPU:2", "CPU:0"]


def test_mirrored_strategy_is_a_plain_layer():
    strategy = mirrored(2)
    with strategy.scope():
        layer = ShardedEmbedding(10, 3, 3)
        layer.build()
    table = layer.full_table().numpy()
    ids = np.array([[1, 2, 1], [9, 0, 4], [5, 5, 5], [3, 8, 7]])
    dataset = tf.data.Dataset.from_tensor_slices(ids).batch(4)
    batch = next(iter(strategy.experimental_distribute_dataset(dataset)))

    @tf.function
    def step(x):
        def replica(x):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(layer(x))
            return layer(x), tape.gradient(loss, layer.shards)

        return strategy.run(replica, args=(x,))

    out, grads = step(batch)
    got = np.concatenate([v.numpy() for v in
                          strategy.experimental_local_results(out)])
    np.testing.assert_array_equal(got, table[ids])
    assert len(strategy.experimental_local_results(grads[0])) == 2


# --------------------------------------------------------------------------
# Serialization and export.
# --------------------------------------------------------------------------


def _model(num_shards=3):
    ids = keras.Input((None,), dtype="int32")
    emb = ShardedEmbedding(
        11, 4, num_shards,
        embeddings_initializer=keras.initializers.RandomNormal(seed=3),
        embeddings_regularizer=keras.regularizers.L2(1e-3),
        embeddings_constraint=keras.constraints.MaxNorm(2.0, axis=1),
        name="emb",
    )(ids)
    out = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling1D()(emb))
    model = keras.Model(ids, out)
    rng = np.random.RandomState(0)
    for v in model.weights:
        v.assign(rng.normal(size=v.shape).astype("float32"))
    return model


def test_get_config_round_trip():
    layer = ShardedEmbedding(
        10, 3, 2, shard_devices=["/CPU:0", "/CPU:1"], mask_zero=True,
        embeddings_initializer="zeros", name="e")
    config = layer.get_config()
    for key in ("input_dim", "output_dim", "num_shards", "shard_devices",
                "embeddings_initializer", "embeddings_regularizer",
                "embeddings_constraint", "mask_zero"):
        assert key in config
    clone = ShardedEmbedding.from_config(config)
    assert clone.get_config() == config
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(layer))
    assert isinstance(restored, ShardedEmbedding)
    assert restored.get_config() == config


def test_keras_file_round_trip(tmp_path):
    model = _model()
    ids = np.array([[1, 10, 1], [0, 4, 7]])
    expected = model.predict(ids, verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert isinstance(loaded.get_layer("emb"), ShardedEmbedding)
    assert len(loaded.get_layer("emb").shards) == 3
    np.testing.assert_array_equal(loaded.predict(ids, verbose=0), expected)


def test_export_saved_model(tmp_path):
    model = _model()
    ids = np.array([[1, 10, 1], [0, 4, 7]], np.int32)
    expected = model.predict(ids, verbose=0)
    path = str(tmp_path / "exported")
    model.export(path, verbose=False)
    reloaded = tf.saved_model.load(path)
    assert_close(reloaded.serve(tf.constant(ids)).numpy(), expected,
                 FORWARD, what="serve")


# --------------------------------------------------------------------------
# Bad input.
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(num_shards=0), ValueError, "num_shards=0"),
        (dict(num_shards=-2), ValueError, "num_shards=-2"),
        (dict(num_shards=2.0), TypeError, "num_shards=2.0"),
        (dict(num_shards=11), ValueError, "num_shards=11"),
        (dict(input_dim=0), ValueError, "input_dim=0"),
        (dict(output_dim=0), ValueError, "output_dim=0"),
        (dict(shard_devices=["/CPU:0"]), ValueError, "shard_devices="),
        (dict(shard_devices=[0, 1]), TypeError, r"shard_devices\[0\]=0"),
        (dict(mask_zero=1), TypeError, "mask_zero=1"),
    ],
)
def test_bad_arguments(kwargs, error, message):
    args = dict(input_dim=10, output_dim=3, num_shards=2)
    args.update(kwargs)
    with pytest.raises(error, match=message):
        ShardedEmbedding(**args)


@pytest.mark.parametrize(
    "ids, message",
    [
        (np.array([1, 10]), "contains 10"),
        (np.array([[3, -1], [2, 12]]), "contains -1, 12"),
        (np.array([-5]), "contains -5"),
    ],
)
def test_ids_out_of_range_eager(ids, message):
    layer = ShardedEmbedding(10, 3, 2)
    with pytest.raises(ValueError, match=message) as info:
        layer(ids)
    assert "input_dim=10" in str(info.value)


@pytest.mark.parametrize("bad", [10, -1])
def test_ids_out_of_range_in_graph(bad):
    layer = ShardedEmbedding(10, 3, 2)
    layer.build()

    @tf.function
    def lookup(ids):
        return layer(ids)

    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"inputs.*must hold ids in \[0, 10\)"):
        lookup(tf.constant([1, bad, 2]))


@pytest.mark.parametrize("ids", [np.array([1.0, 2.0]), np.array([True])])
def test_non_integer_ids(ids):
    layer = ShardedEmbedding(10, 3, 2)
    with pytest.raises(TypeError, match=r"inputs.dtype=(float64|bool)"):
        layer(ids)


def test_ragged_ids():
    layer = ShardedEmbedding(10, 3, 2)
    with pytest.raises(TypeError, match="`inputs` must be a dense tensor"):
        layer(tf.ragged.constant([[1], [2, 3]]))


def test_xla_says_the_lookup_does_not_compile():
    """Instead of a compile-time-constant error from inside tf.unique."""
    layer = ShardedEmbedding(10, 3, 2)
    with pytest.raises(ValueError, match="does not compile with XLA"):
        tf.function(layer, jit_compile=True)(tf.constant([1, 2]))


def test_set_full_table_shape():
    layer = ShardedEmbedding(10, 3, 2)
    with pytest.raises(ValueError, match=r"table.shape=\(9, 3\)"):
        layer.set_full_table(np.zeros((9, 3), np.float32))


def test_ids_of_unknown_rank():
    layer = ShardedEmbedding(10, 3, 2)
    run = tf.function(layer, input_signature=[tf.TensorSpec(None, tf.int32)])
    ids = np.array([[1, 7], [9, 0]], np.int32)
    np.testing.assert_array_equal(run(ids).numpy(), layer(ids).numpy())
