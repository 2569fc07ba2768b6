"""The sharded embedding and the sampled softmax: the original's
ParallelEmbeddingLookup, SampledSoftmaxLoss and ParallelSampledSoftmaxLoss
against keras_moe's ShardedEmbedding and SampledSoftmaxLoss
(tests/fixtures/embedding_softmax.npz, tools/make_embedding_fixtures.py,
tests/test_parity.py).
"""

import os

import numpy as np

from reference_harness import FIXTURES_DIR
from reference_harness.cases import by_name, describe, f32, rng
from reference_harness.original import session_config

FIXTURES = os.path.join(FIXTURES_DIR, "embedding_softmax.npz")
TOOL = "tools/make_embedding_fixtures.py"

# Lookups (ShardedEmbedding's arguments): a table of `input_dim` rows of
# width `output_dim`, mod-sharded over `num_shards` variables, looked up by
# `len(datashards)` datashards of ids (sizes as given; every datashard
# repeats ids).
EMBEDDING_DEFAULTS = dict(kind="embedding", input_dim=None, output_dim=None,
                          num_shards=None, datashards=None)

# Sampled softmax (SampledSoftmaxLoss's arguments) over `num_classes`
# classes (class table of width `feature_dim`, mod-sharded over
# `num_shards`), `num_sampled` fixed sampled classes per datashard. In each
# datashard the first sampled class is a target of that datashard; in the
# last datashard one sampled class is drawn twice when `duplicate`; the
# examples are weighted when `weighted`.
SOFTMAX_DEFAULTS = dict(kind="softmax", num_classes=None, feature_dim=None,
                        num_shards=None, datashards=None, num_sampled=None,
                        duplicate=False, weighted=True)


def _embedding(name, **kwargs):
    return describe(EMBEDDING_DEFAULTS, name, kwargs)


def _softmax(name, **kwargs):
    return describe(SOFTMAX_DEFAULTS, name, kwargs)


EMBEDDING_CASES = [
    _embedding("emb_multiple", input_dim=12, output_dim=5, num_shards=3,
               datashards=(9,)),
    _embedding("emb_not_multiple", input_dim=10, output_dim=4, num_shards=3,
               datashards=(8, 11)),
    _embedding("emb_not_multiple_4shards", input_dim=11, output_dim=3,
               num_shards=4, datashards=(7, 5, 9)),
    _embedding("emb_one_shard", input_dim=7, output_dim=4, num_shards=1,
               datashards=(6, 6)),
]

SOFTMAX_CASES = [
    _softmax("ssm_not_multiple", num_classes=11, feature_dim=5, num_shards=3,
             datashards=(6, 4), num_sampled=4),
    _softmax("ssm_multiple_duplicate", num_classes=12, feature_dim=4,
             num_shards=2, datashards=(5, 7), num_sampled=5, duplicate=True),
    _softmax("ssm_one_shard_unweighted", num_classes=9, feature_dim=3,
             num_shards=1, datashards=(8,), num_sampled=3, weighted=False),
]

CASES = EMBEDDING_CASES + SOFTMAX_CASES
CASES_BY_NAME = by_name(CASES)


def table_shape(case):
    """(rows, width) of the case's table: the vocabulary or the classes."""
    if case["kind"] == "embedding":
        return case["input_dim"], case["output_dim"]
    return case["num_classes"], case["feature_dim"]


def log_uniform_expected_count(vocab, num_sampled):
    """`num_sampled * P(class)` of the log-uniform (Zipfian) distribution
    over `vocab` classes, float32 `[vocab]`: the expected counts the cases
    feed both implementations."""
    c = np.arange(vocab, dtype=np.float64)
    p = np.log((c + 2.0) / (c + 1.0)) / np.log(vocab + 1.0)
    return np.asarray(num_sampled * p, np.float32)


def make_data(case):
    """Deterministic table, ids (and for softmax cases features, targets,
    draws, weights) of an embedding or softmax case (numpy).

    Keys: table [vocab, depth]; per datashard i: ids_i / targets_i
    [size_i] (int32, with repeats); embedding: coef_i [size_i, depth]
    (the test loss is sum_i sum(emb_i * coef_i)); softmax: features_i
    [size_i, depth], sampled_i [num_sampled] (int32), weights_i [size_i];
    expected_count [vocab]."""
    r = rng(case)
    v, d = table_shape(case)
    data = {"table": f32(0.5 * r.normal(size=(v, d)))}
    for i, size in enumerate(case["datashards"]):
        ids = r.randint(0, v, size=size)
        ids[size // 2] = ids[0]  # a repeated id in every datashard
        ids[-1] = v - 1  # the last id: in the last shard when not multiple
        if case["kind"] == "embedding":
            data["ids_%d" % i] = ids.astype(np.int32)
            data["coef_%d" % i] = f32(r.normal(size=(size, d)))
            continue
        data["targets_%d" % i] = ids.astype(np.int32)
        data["features_%d" % i] = f32(r.normal(size=(size, d)))
        sampled = r.choice(
            [c for c in range(v) if c != ids[0]], case["num_sampled"],
            replace=False)
        sampled[0] = ids[0]  # a sampled class equal to a target (twice)
        if case["duplicate"] and i == len(case["datashards"]) - 1:
            sampled[-1] = sampled[1]
        data["sampled_%d" % i] = sampled.astype(np.int32)
        data["weights_%d" % i] = (
            f32(r.uniform(0.0, 2.0, size=size)) if case["weighted"]
            else np.ones(size, np.float32))
    if case["kind"] == "softmax":
        data["expected_count"] = log_uniform_expected_count(
            v, case["num_sampled"])
    return data


class _FixedDrawSampler(object):
    """Stands in for the original's (unpublished) candidate sampler object:
    `sample()` returns the next fixed draw (one call per datashard, in
    order), `log_expected_count(classes)` reads a table of expected counts."""

    def __init__(self, draws, expected_count):
        import tensorflow as tf

        self._draws = list(draws)
        self._log_q = tf.math.log(tf.constant(expected_count))

    def sample(self):
        import tensorflow as tf

        return tf.constant(self._draws.pop(0))

    def log_expected_count(self, classes):
        import tensorflow as tf

        return tf.gather(self._log_q, classes)


def _full_table_order(per_shard, vocab):
    """Rows of a mod-sharded table (a list of [rows_s, ...]) in id order."""
    import tensorflow as tf

    n = len(per_shard)
    return tf.dynamic_stitch([tf.range(s, vocab, n) for s in range(n)],
                             per_shard)


def run_original(module, case, data):
    """Runs an embedding or softmax case through the original.

    The table's shards are `v1` variables holding table[s::num_shards] (the
    original's mod sharding; for a vocabulary that is not a multiple of the
    shard count the first shards have one row more), all on /cpu:0; one
    datashard per entry of case["datashards"].

    Returns {"ref": results}; results has
      embedding: emb_i [size_i, depth] from ParallelEmbeddingLookup;
        grad/table [vocab, depth], d(sum_i sum(emb_i * coef_i))/d table.
      softmax: loss_i [size_i], SampledSoftmaxLoss of datashard i (target
        and sampled rows from ParallelEmbeddingLookup); total, the
        ParallelSampledSoftmaxLoss with target_weights; grad/table and
        grad/features_i, d total / d (table, features_i).
    """
    import tensorflow as tf

    v1 = tf.compat.v1
    n, (vocab, _) = case["num_shards"], table_shape(case)
    num_datashards = len(case["datashards"])
    graph = v1.Graph()
    with graph.as_default():
        with v1.device("/cpu:0"):
            params = [
                v1.get_variable(
                    "shard_%d" % s,
                    initializer=v1.constant(data["table"][s::n]))
                for s in range(n)
            ]
        dp = module.Parallelism(["/cpu:0"] * num_datashards)
        fetch = {}
        if case["kind"] == "embedding":
            ids = [v1.constant(data["ids_%d" % i])
                   for i in range(num_datashards)]
            embs = module.ParallelEmbeddingLookup(params, ids, dp)
            loss = tf.add_n([
                tf.reduce_sum(e * v1.constant(data["coef_%d" % i]))
                for i, e in enumerate(embs)])
            for i, e in enumerate(embs):
                fetch["emb_%d" % i] = e
            wrt = list(params)
        else:
            draws = [data["sampled_%d" % i] for i in range(num_datashards)]
            features = [v1.constant(data["features_%d" % i])
                        for i in range(num_datashards)]
            targets = [v1.constant(data["targets_%d" % i])
                       for i in range(num_datashards)]
            weights = [v1.constant(data["weights_%d" % i])
                       for i in range(num_datashards)]
            total = module.ParallelSampledSoftmaxLoss(
                params, features, targets,
                _FixedDrawSampler(draws, data["expected_count"]), vocab, dp,
                target_weights=weights)
            # Per-example losses: the original's SampledSoftmaxLoss on the
            # same draws and the same looked-up rows.
            sampler = _FixedDrawSampler(draws, data["expected_count"])
            sampled = dp(sampler.sample)
            sampled_params = module.ParallelEmbeddingLookup(params, sampled,
                                                            dp)
            target_params = module.ParallelEmbeddingLookup(params, targets,
                                                           dp)
            per_example = dp(module.SampledSoftmaxLoss, features, sampler,
                             vocab, targets, target_params, sampled,
                             sampled_params)
            for i, l in enumerate(per_example):
                fetch["loss_%d" % i] = l
            fetch["total"] = total
            loss = total
            wrt = list(params) + features
        grads = v1.gradients(loss, wrt)
        grads = [tf.convert_to_tensor(g) for g in grads]
        fetch["grad/table"] = _full_table_order(grads[:n], vocab)
        if case["kind"] == "softmax":
            for i in range(num_datashards):
                fetch["grad/features_%d" % i] = grads[n + i]
        init = v1.global_variables_initializer()
        with v1.Session(graph=graph, config=session_config()) as sess:
            sess.run(init)
            res = sess.run(fetch)
    return {"ref": {k: np.asarray(v, np.float32) for k, v in res.items()}}
