"""Numerical parity of keras_moe with the original 2017 `expert_utils.py`.

The cases of the reference harness's suites (reference_harness.flat,
.hierarchical, .embedding_softmax) run through keras_moe, and the results
are compared with

* the committed fixtures in tests/fixtures/ (always), written by the
  tools/make_*_fixtures.py scripts from the original; and
* the original itself, run live in a TF1 graph via tf.compat.v1 when it is
  found at `$KERAS_MOE_ORIGINAL` or `<repo>/../shared/reference/
  expert_utils_2017.py` (skipped otherwise); and the committed fixtures
  are compared with it too.

Families, and what each compares (in training and in inference for the
MoEs):

* flat (parity.npz): MixtureOfExperts against LocalMixtureOfExperts (with
  `gating_inputs`, a DistributedMixtureOfExperts on one datashard): the
  gates (times `gate_multiplier`), importance, load, outputs, aux loss and
  the gradients of `sum(y**2) + aux_loss` w.r.t. every weight (expert
  kernels stacked over experts); and NoisyTopKGating alone: gates, load,
  and the gradients of the gating-alone loss `sum(gates * C) +
  sum(load * L)`.
* hierarchical (parity_hierarchical.npz): HierarchicalMixtureOfExperts
  (flat: MixtureOfExperts) against the original's
  DistributedMixtureOfExperts -- hierarchical (a secondary
  LocalMixtureOfExperts per group) or flat -- over one or several
  datashards on /cpu:0, ours on the datashards concatenated in order, with
  the same weights and noise: the primary draw `[T, n1]` feeds each
  datashard's primary RandomStandardNormal op its rows, and the secondary
  draw `[T, n1, n2]` feeds group i's op `secondary[rows_i, i]` (rows_i:
  the tokens routed to group i, in increasing order), which is what ours
  reads through `noise=(primary, secondary)`. Compared: the combined gates
  (same support), importance and load `[n1, n2]`, outputs, aux loss, the
  original's `expert_to_gates` and `expert_to_identifiers` (identifiers =
  token rows) against ours `routing["expert_gates"]` /
  `routing["token_index"]`, and the gradients w.r.t. every weight. Against
  the live original only the `LIVE_CASES` subset runs by default (its
  graphs are slow to build); KERAS_MOE_PARITY_LIVE=all runs every case.
* embedding and softmax (embedding_softmax.npz): ShardedEmbedding against
  ParallelEmbeddingLookup, for vocabularies that are and are not multiples
  of the shard count, over several datashards with repeated ids, with the
  gradient w.r.t. the table; SampledSoftmaxLoss against SampledSoftmaxLoss
  / ParallelSampledSoftmaxLoss for fixed sampled classes -- one of them a
  target in every datashard, one drawn twice in a case -- with
  per-example weights: the per-example losses, the weighted total, and the
  gradients w.r.t. the class table and the features.

Tolerances: the rule of tests/numerics.py, each tensor within
`tol * scale` of the reference: forward quantities at depth FORWARD,
gradients at depth GRADIENT; lookups exactly. A gradient's scale is at
least the largest gradient of the case and mode (the float32 rounding the
original leaves in mathematically zero gradients is relative to that), and
for the gating-alone loss at least `|x|^T (|C| + |L|)`, since with k = 1
all its gradients are zero (a softmax over one logit) and the reference is
rounding noise.

Known, documented deviation: in inference the original's gradients w.r.t.
the noise kernels are NaN (0 * inf inside the erf gradient, the noise
stddev being multiplied by `train` = 0); keras_moe gives exactly zero
there. The tests assert that NaNs occur only there, and that ours is
finite and exactly zero.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np
import pytest
import tensorflow as tf

import keras_moe
from keras_moe.embedding import ShardedEmbedding
from keras_moe.sampled_softmax import SampledSoftmaxLoss
import parity_checks as checks
from parity_checks import Reference, assert_fixture_matches_live, digest
from reference_harness import (
    checkpoints, embedding_softmax, fixtures, flat, hierarchical)
from reference_harness.cases import MODES, num_layers

MODE_NAMES = tuple(mode for mode, _ in MODES)

# --------------------------------------------------------------------------
# keras_moe on a case's data: {group: results} (cached by case and data).
# --------------------------------------------------------------------------


def _moe_kwargs(case, *names):
    """The layer arguments of a case: its keys of the same names."""
    return {name: case[name] for name in names}


MOE_ARGS = ("k", "output_dim", "hidden_sizes", "autoscale", "noisy_gating",
            "noise_epsilon", "loss_coef")


def ours_flat_moe(case, data):
    x = tf.constant(data["x"])
    kwargs = {}
    if case["gating_inputs"]:
        kwargs["gating_inputs"] = tf.constant(data["gating_x"])
    if case["gate_multiplier"]:
        kwargs["gate_multiplier"] = tf.constant(data["multiplier"])
    layer = keras_moe.MixtureOfExperts(
        **_moe_kwargs(case, "num_experts", *MOE_ARGS))
    layer(x, training=False, **kwargs)  # build
    weights = {"gate_kernel": layer.gating.gate_kernel}
    if case["noisy_gating"]:
        weights["noise_kernel"] = layer.gating.noise_kernel
    for l in range(num_layers(case)):
        weights["kernel_%d" % l] = layer.experts.kernels[l]
    names = flat.weight_names(case)
    for name in names:
        weights[name].assign(data[name])
    if case["noisy_gating"]:
        kwargs["noise"] = tf.constant(data["noise"])

    results = {}
    for mode, training in MODES:
        with tf.GradientTape() as tape:
            y, routing = layer(x, training=training, return_routing=True,
                               **kwargs)
            loss = tf.reduce_sum(y**2) + routing["aux_loss"]
        grads = tape.gradient(loss, [weights[n] for n in names])
        res = {
            "gates": routing["gates"],
            "load": routing["load"],
            "importance": routing["importance"],
            "y": y,
            "aux_loss": routing["aux_loss"],
        }
        for name, g in zip(names, grads):
            res["grad/" + name] = (g if g is not None else
                                   tf.zeros_like(weights[name]))
        results[mode] = {k: np.asarray(v) for k, v in res.items()}
    return results


def ours_flat_gating(case, data):
    gx = tf.constant(data["gating_x"] if case["gating_inputs"] else data["x"])
    layer = keras_moe.NoisyTopKGating(
        case["num_experts"],
        **_moe_kwargs(case, "k", "noisy_gating", "noise_epsilon"))
    layer(gx, training=False)  # build
    weights = {"gate_kernel": layer.gate_kernel}
    if case["noisy_gating"]:
        weights["noise_kernel"] = layer.noise_kernel
    names = flat.gating_weight_names(case)
    for name in names:
        weights[name].assign(data[name])
    kwargs = ({"noise": tf.constant(data["noise"])} if case["noisy_gating"]
              else {})
    coef_gates = tf.constant(data["gating_coef_gates"])
    coef_load = tf.constant(data["gating_coef_load"])
    results = {}
    for mode, training in MODES:
        with tf.GradientTape() as tape:
            gates, load = layer(gx, training=training, **kwargs)
            loss = (tf.reduce_sum(gates * coef_gates) +
                    tf.reduce_sum(load * coef_load))
        grads = tape.gradient(loss, [weights[n] for n in names])
        res = {"gates": gates, "load": load}
        for name, g in zip(names, grads):
            res["gating_grad/" + name] = (g if g is not None else
                                          tf.zeros_like(weights[name]))
        results[mode] = {k: np.asarray(v) for k, v in res.items()}
    return results


def ours_hierarchical(case, data):
    hier = hierarchical.is_hierarchical(case)
    x = tf.constant(data["x"])
    kwargs = {}
    if case["gating_inputs"]:
        kwargs["gating_inputs"] = tf.constant(data["gating_x"])
    if hier:
        layer = keras_moe.HierarchicalMixtureOfExperts(**_moe_kwargs(
            case, "num_groups", "experts_per_group", "group_k", *MOE_ARGS))
    else:
        layer = keras_moe.MixtureOfExperts(
            **_moe_kwargs(case, "num_experts", *MOE_ARGS))
    layer(x, training=False, **kwargs)  # build

    # Each weight of hierarchical.weight_names: one variable. The
    # hierarchical layer's are stacked over groups (its experts' kernels
    # flat over (group, expert), the fixtures' [groups, experts, in, out]).
    if hier:
        weights = {"primary_gate_kernel": layer.primary_gating.gate_kernel,
                   "secondary_gate_kernel":
                       layer.secondary_gating.gate_kernel}
        if case["noisy_gating"]:
            weights["primary_noise_kernel"] = layer.primary_gating.noise_kernel
            weights["secondary_noise_kernel"] = (
                layer.secondary_gating.noise_kernel)
    else:
        weights = {"primary_gate_kernel": layer.gating.gate_kernel}
        if case["noisy_gating"]:
            weights["primary_noise_kernel"] = layer.gating.noise_kernel
    for l in range(num_layers(case)):
        weights["kernel_%d" % l] = layer.experts.kernels[l]
    names = hierarchical.weight_names(case)
    flat_vars = [weights[name] for name in names]
    for name, var in zip(names, flat_vars):
        var.assign(np.reshape(data[name], var.shape))
    if case["noisy_gating"]:
        primary = tf.constant(data["primary_noise"])
        kwargs["noise"] = ((primary, tf.constant(data["secondary_noise"]))
                           if hier else primary)

    results = {}
    for mode, training in MODES:
        with tf.GradientTape() as tape:
            y, routing = layer(x, training=training, return_routing=True,
                               **kwargs)
            loss = tf.reduce_sum(y**2) + routing["aux_loss"]
        grads = [g if g is not None else tf.zeros_like(v)
                 for g, v in zip(tape.gradient(loss, flat_vars), flat_vars)]
        res = {key: routing[key] for key in (
            "gates", "importance", "load", "aux_loss", "expert_gates",
            "token_index", "expert_index")}
        res["y"] = y
        for name, grad in zip(names, grads):
            res["grad/" + name] = tf.reshape(grad, data[name].shape)
        results[mode] = {k: np.asarray(v) for k, v in res.items()}
    return results


def _table_order(grads, num_classes, num_shards):
    """The shards' gradients as one table, rows in id order."""
    return tf.dynamic_stitch(
        [tf.range(s, num_classes, num_shards) for s in range(num_shards)],
        [tf.convert_to_tensor(g) for g in grads]).numpy()


def ours_embedding(case, data):
    layer = ShardedEmbedding(
        **_moe_kwargs(case, "input_dim", "output_dim", "num_shards"))
    layer.set_full_table(data["table"])
    out = {}
    with tf.GradientTape() as tape:
        loss = 0.0
        for i in range(len(case["datashards"])):
            emb = layer(tf.constant(data["ids_%d" % i]))
            out["emb_%d" % i] = emb.numpy()
            loss += tf.reduce_sum(emb * data["coef_%d" % i])
    out["grad/table"] = _table_order(tape.gradient(loss, layer.shards),
                                     case["input_dim"], case["num_shards"])
    return {"ref": out}


def ours_softmax(case, data):
    num_datashards = len(case["datashards"])
    n = case["num_shards"]
    layer = SampledSoftmaxLoss(case["num_classes"], case["num_sampled"],
                               num_shards=n)
    layer.build((None, case["feature_dim"]))
    layer.embedding.set_full_table(data["table"])
    q = data["expected_count"]
    features = [tf.constant(data["features_%d" % i])
                for i in range(num_datashards)]
    out = {}
    with tf.GradientTape() as tape:
        tape.watch(features)
        total = 0.0
        for i in range(num_datashards):
            targets = data["targets_%d" % i]
            sampled = data["sampled_%d" % i]
            sampled_values = (sampled, q[targets], q[sampled])
            out["loss_%d" % i] = layer(
                features[i], targets, training=True,
                sampled_values=sampled_values).numpy()
            total += tf.reduce_sum(layer(
                features[i], targets, training=True,
                sample_weight=data["weights_%d" % i],
                sampled_values=sampled_values))
    out["total"] = total.numpy()
    grads = tape.gradient(total, layer.embedding.shards + features)
    out["grad/table"] = _table_order(grads[:n], case["num_classes"], n)
    for i in range(num_datashards):
        out["grad/features_%d" % i] = grads[n + i].numpy()
    return {"ref": out}


_OURS = {}


def ours(run, case, data):
    key = (run.__name__, case["name"], digest(data))
    if key not in _OURS:
        _OURS[key] = run(case, data)
    return _OURS[key]


# --------------------------------------------------------------------------
# The families: a harness suite's cases (or some), keras_moe's runs on them
# and how each is compared.
# --------------------------------------------------------------------------

# Hierarchical cases run against the live original by default (each of its
# graphs takes seconds to build): several datashards, k = 1 and k = n at
# each level, an empty group, clean gating, hidden layers with shadow_xs,
# and the flat distributed MoE. KERAS_MOE_PARITY_LIVE=all runs every case.
LIVE_CASES = (
    "h_noisy_k1_gk_eq_n",
    "h_clean_k_eq_n_gk1",
    "h_empty_group",
    "h_gating_inputs",
    "flat_3shards",
)


class Family:
    """cases: the suite's cases compared here; groups: their result groups
    (the modes, or "ref"); runs: {name: (ours_run, check)}; live_cases:
    the case names compared with the live original; gradient_terms(case,
    data): the `grad_floor` terms of each gradient prefix."""

    def __init__(self, name, suite, reference, cases, groups, runs,
                 live_cases=None, gradient_terms=lambda case, data: {}):
        self.name, self.suite, self.reference = name, suite, reference
        self.cases, self.groups, self.runs = cases, groups, runs
        self.live_cases = ([c["name"] for c in cases] if live_cases is None
                           else list(live_cases))
        self.gradient_terms = gradient_terms


def _hierarchical_live_cases():
    if os.environ.get("KERAS_MOE_PARITY_LIVE", "").lower() == "all":
        return None
    return LIVE_CASES


_EMBEDDING_SOFTMAX = Reference(embedding_softmax)
FAMILIES = {f.name: f for f in (
    Family("flat", flat, Reference(flat), flat.CASES, MODE_NAMES,
           {"moe": (ours_flat_moe, checks.check_flat_moe),
            "gating": (ours_flat_gating, checks.check_flat_gating)},
           gradient_terms=lambda case, data: {
               "gating_grad": checks.gating_gradient_terms(case, data)}),
    Family("hierarchical", hierarchical, Reference(hierarchical),
           hierarchical.CASES, MODE_NAMES,
           {"moe": (ours_hierarchical, checks.check_hierarchical)},
           live_cases=_hierarchical_live_cases()),
    Family("embedding", embedding_softmax, _EMBEDDING_SOFTMAX,
           embedding_softmax.EMBEDDING_CASES, ("ref",),
           {"lookup": (ours_embedding, checks.check_embedding)}),
    Family("softmax", embedding_softmax, _EMBEDDING_SOFTMAX,
           embedding_softmax.SOFTMAX_CASES, ("ref",),
           {"loss": (ours_softmax, checks.check_softmax)}),
)}


def _param(*values):
    """A pytest.param named by its values (one group: not named)."""
    name = "-".join(v for v in values if v != "ref")
    return pytest.param(*values, id=name)


def _parity_params():
    for source in ("fixture", "live"):
        for family in FAMILIES.values():
            names = ([c["name"] for c in family.cases] if source == "fixture"
                     else family.live_cases)
            for case_name in names:
                for run in family.runs:
                    for group in family.groups:
                        yield _param(source, family.name, run, case_name,
                                     group)


def _live_params():
    for family in FAMILIES.values():
        for case_name in family.live_cases:
            for group in family.groups:
                yield _param(family.name, case_name, group)


def _case_params():
    for family in FAMILIES.values():
        for case in family.cases:
            yield _param(family.name, case["name"])


# --------------------------------------------------------------------------
# Tests.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("source, family, run, case_name, group",
                         list(_parity_params()))
def test_matches_the_original(source, family, run, case_name, group):
    """keras_moe against the committed fixtures (always) or the original
    run now (skipped when absent)."""
    if source == "live":
        checks.require_original()
    family = FAMILIES[family]
    ours_run, check = family.runs[run]
    case, data, results = family.reference(source, case_name)
    check(case, data, results[group], ours(ours_run, case, data)[group],
          group, "fixture" if source == "fixture" else "live oracle")


@pytest.mark.parametrize("family, case_name, group", list(_live_params()))
def test_fixture_matches_the_live_original(family, case_name, group):
    """The committed fixtures are what the original computes here."""
    checks.require_original()
    family = FAMILIES[family]
    case, data, results = family.reference.live(case_name)
    _, _, stored = family.reference.fixture(case_name)
    assert_fixture_matches_live(case_name, group, results[group],
                                stored[group],
                                family.gradient_terms(case, data))


@pytest.mark.parametrize("family, case_name", list(_case_params()))
def test_fixture_is_current(family, case_name):
    """The stored case and data are what the harness defines now;
    otherwise regenerate the file with its tool (the suite's TOOL)."""
    family = FAMILIES[family]
    case, data, _ = family.reference.fixture(case_name)
    assert case == family.suite.CASES_BY_NAME[case_name]
    expected = family.suite.make_data(case)
    assert sorted(data) == sorted(expected)
    for key in expected:
        np.testing.assert_array_equal(data[key], expected[key], err_msg=key)


@pytest.mark.parametrize("path, cases", [
    (flat.FIXTURES, flat.CASES),
    (hierarchical.FIXTURES, hierarchical.CASES),
    (embedding_softmax.FIXTURES, embedding_softmax.CASES),
    (checkpoints.OUTPUTS,
     [checkpoints.CASES[k] for k in checkpoints.COMMITTED_KINDS]),
], ids=["flat", "hierarchical", "embedding_softmax", "checkpoints"])
def test_every_fixture_file_has_the_one_format(path, cases):
    # reference_harness.fixtures reads it (FixtureFile checks the format),
    # and it holds exactly the harness's cases, in order.
    assert fixtures.FixtureFile(path).names() == [c["name"] for c in cases]


# The parity comparisons, under the same tolerances, fail on the smallest
# defects that matter (tests/numerics.py).


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_an_expert_kernel_off_by_1e_3_fails(mode):
    case, data, results = FAMILIES["flat"].reference.fixture(
        "hidden_autoscale")
    checks.check_flat_moe(case, data, results[mode],
                          ours(ours_flat_moe, case, data)[mode], mode,
                          "fixture")
    # The expert that receives the most tokens, its last layer scaled.
    gates = results[mode]["gates"]
    busiest = int(np.argmax(np.sum(gates != 0, axis=0)))
    name = flat.weight_names(case)[-1]
    defective = dict(data)
    defective[name] = data[name].copy()
    defective[name][busiest] *= np.float32(1 + 1e-3)
    with pytest.raises(AssertionError, match=" y|grad"):
        checks.check_flat_moe(case, data, results[mode],
                              ours(ours_flat_moe, case, defective)[mode],
                              mode, "fixture")


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_a_gate_kernel_column_off_by_1e_3_fails(mode):
    case, data, results = FAMILIES["flat"].reference.fixture("clean_k2")
    checks.check_flat_gating(case, data, results[mode],
                             ours(ours_flat_gating, case, data)[mode], mode,
                             "fixture")
    defective = dict(data)
    defective["gate_kernel"] = data["gate_kernel"].copy()
    defective["gate_kernel"][:, 0] *= np.float32(1 + 1e-3)
    with pytest.raises(AssertionError, match="gates|load|grad"):
        checks.check_flat_gating(
            case, data, results[mode],
            ours(ours_flat_gating, case, defective)[mode], mode, "fixture")


# What the cases cover.


def test_hierarchical_cases_cover_the_edges():
    # Several datashards, k = 1 and k = n at each level, noisy and
    # clean, hidden layers, shadow_xs, an empty group.
    reference = FAMILIES["hierarchical"].reference
    cases = [reference.fixture(c["name"])[0] for c in hierarchical.CASES]
    hier = [c for c in cases if hierarchical.is_hierarchical(c)]
    assert any(len(c["datashards"]) == 1 for c in hier)
    assert any(len(c["datashards"]) >= 3 for c in hier)
    for noisy in (True, False):
        sub = [c for c in hier if c["noisy_gating"] == noisy]
        assert any(c["k"] == 1 for c in sub)
        assert any(c["k"] == c["num_groups"] for c in sub)
        assert any(c["group_k"] == 1 for c in sub)
        assert any(c["group_k"] == c["experts_per_group"] for c in sub)
        assert any(c["gating_inputs"] for c in sub)
    assert any(c["hidden_sizes"] for c in hier)
    assert any(c["empty_group"] for c in hier)
    # The empty group really is empty.
    case, _, results = reference.fixture("h_empty_group")
    for mode in MODE_NAMES:
        gates = results[mode]["gates"]
        assert np.count_nonzero(gates[:, -case["experts_per_group"]:]) == 0
        assert np.count_nonzero(gates[:, :-case["experts_per_group"]]) > 0


def test_softmax_cases_cover_a_sampled_target_and_a_duplicate():
    for case in embedding_softmax.SOFTMAX_CASES:
        data = embedding_softmax.make_data(case)
        for i in range(len(case["datashards"])):
            assert data["sampled_%d" % i][0] in data["targets_%d" % i]
    case = embedding_softmax.CASES_BY_NAME["ssm_multiple_duplicate"]
    data = embedding_softmax.make_data(case)
    last = data["sampled_%d" % (len(case["datashards"]) - 1)]
    assert len(set(last.tolist())) < len(last)
