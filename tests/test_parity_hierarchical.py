"""Parity of keras_moe with the original `DistributedMixtureOfExperts`.

The original (expert_utils_2017.py, not part of this project) runs in a TF1
graph via tf.compat.v1 (harness: tests/oracle.py), as a hierarchical MoE (a
secondary `LocalMixtureOfExperts` per group) and as a flat one, over one or
several datashards on /cpu:0. keras_moe's `HierarchicalMixtureOfExperts`
(flat: `MixtureOfExperts`) runs on the datashards concatenated in order,
with the same weights and the same noise: the primary draw `[T, n1]` feeds
each datashard's primary RandomStandardNormal op its rows, and the
secondary draw `[T, n1, n2]` feeds group i's op `secondary[rows_i, i]`
(rows_i: the tokens routed to group i, in increasing order), which is what
ours reads through `noise=(primary, secondary)`.

Compared, in training and in inference: the combined gates (same support),
importance `[n1, n2]`, load `[n1, n2]`, outputs, aux loss, the original's
`expert_to_gates` and `expert_to_identifiers` (identifiers = token rows)
against ours `routing["expert_gates"]` / `routing["token_index"]`, and the
gradients of `sum(y**2) + aux_loss` w.r.t. every weight (primary and
secondary gate and noise kernels, every expert kernel).

Reference data: the committed tests/fixtures/parity_hierarchical.npz
(always; regenerate with tools/make_hierarchical_fixtures.py) and the
original run now when it is found (same lookup as tests/oracle.py), on the
`LIVE_CASES` subset by default -- the original's graphs are slow to build --
and on every case with KERAS_MOE_PARITY_LIVE=all.

Tolerances as in tests/test_parity.py (the rule of tests/numerics.py:
forward quantities at depth FORWARD, gradients at depth GRADIENT with the
largest gradient of the case as their floor). In inference the original's gradients w.r.t.
the noise kernels are NaN (0 * inf in erf's gradient); ours must be finite
and exactly zero there (the documented deviation).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np
import tensorflow as tf
from absl.testing import parameterized
from keras.src import testing

import keras_moe
import oracle
from numerics import FORWARD, GRADIENT
from parity_checks import (
    NO_ORIGINAL, FixtureFile, LiveOriginal, assert_fixture_matches_live,
    assert_matches, digest, grad_floor,
)


# Cases run against the live original by default (each of its graphs takes
# seconds to build): several datashards, k = 1 and k = n at each level, an
# empty group, clean gating, hidden layers with shadow_xs, and the flat
# distributed MoE. KERAS_MOE_PARITY_LIVE=all runs every case.
LIVE_CASES = (
    "h_noisy_k1_gk_eq_n",
    "h_clean_k_eq_n_gk1",
    "h_empty_group",
    "h_gating_inputs",
    "flat_3shards",
)


def _live_case_names():
    if os.environ.get("KERAS_MOE_PARITY_LIVE", "").lower() == "all":
        return [c["name"] for c in oracle.HIER_CASES]
    return list(LIVE_CASES)


PARAMS = [
    dict(testcase_name="%s_%s" % (c["name"], mode), case_name=c["name"],
         mode=mode)
    for c in oracle.HIER_CASES for mode, _ in oracle.MODES
]
CASE_PARAMS = [dict(testcase_name=c["name"], case_name=c["name"])
               for c in oracle.HIER_CASES]
LIVE_PARAMS = [dict(testcase_name=name, case_name=name)
               for name in _live_case_names()]

# --------------------------------------------------------------------------
# Reference data: committed fixtures and the live oracle (both cached).
# --------------------------------------------------------------------------

fixture = FixtureFile(oracle.HIER_DEFAULT_FIXTURES, oracle.unpack_hier,
                      "tools/make_hierarchical_fixtures.py")
live = LiveOriginal(oracle.HIER_CASES_BY_NAME, oracle.make_hier_case_data,
                    oracle.run_hier_oracle)


# --------------------------------------------------------------------------
# keras_moe on the same data (cached by case and data digest).
# --------------------------------------------------------------------------


def _ours(case, data):
    hier = oracle.is_hierarchical(case)
    num_layers = len(oracle.layer_sizes(case)) - 1
    common = dict(
        k=case["k"],
        output_dim=case["output_dim"],
        hidden_sizes=case["hidden"],
        autoscale=case["autoscale"],
        noisy_gating=case["noisy"],
        noise_epsilon=case["noise_epsilon"],
        loss_coef=case["loss_coef"],
    )
    x = tf.constant(data["x"])
    kwargs = {}
    if case["gating_inputs"]:
        kwargs["gating_inputs"] = tf.constant(data["gating_x"])
    if hier:
        layer = keras_moe.HierarchicalMixtureOfExperts(
            num_groups=case["n1"], experts_per_group=case["n2"],
            group_k=case["group_k"], **common)
    else:
        layer = keras_moe.MixtureOfExperts(num_experts=case["n1"], **common)
    layer(x, training=False, **kwargs)  # build

    # Each weight of hier_weight_names: one variable. The hierarchical
    # layer's are stacked over groups (its experts' kernels flat over
    # (group, expert), the fixtures' [groups, experts, in, out]).
    if hier:
        weights = {"primary_gate_kernel": layer.primary_gating.gate_kernel,
                   "secondary_gate_kernel":
                       layer.secondary_gating.gate_kernel}
        if case["noisy"]:
            weights["primary_noise_kernel"] = layer.primary_gating.noise_kernel
            weights["secondary_noise_kernel"] = (
                layer.secondary_gating.noise_kernel)
    else:
        weights = {"primary_gate_kernel": layer.gating.gate_kernel}
        if case["noisy"]:
            weights["primary_noise_kernel"] = layer.gating.noise_kernel
    for l in range(num_layers):
        weights["kernel_%d" % l] = layer.experts.kernels[l]
    names = oracle.hier_weight_names(case)
    flat_vars = [weights[name] for name in names]
    for name, var in zip(names, flat_vars):
        var.assign(np.reshape(data[name], var.shape))
    if case["noisy"]:
        primary = tf.constant(data["primary_noise"])
        kwargs["noise"] = ((primary, tf.constant(data["secondary_noise"]))
                           if hier else primary)

    results = {}
    for mode, training in oracle.MODES:
        with tf.GradientTape() as tape:
            y, routing = layer(x, training=training, return_routing=True,
                               **kwargs)
            loss = tf.reduce_sum(y**2) + routing["aux_loss"]
        grads = [g if g is not None else tf.zeros_like(v)
                 for g, v in zip(tape.gradient(loss, flat_vars), flat_vars)]
        res = {
            "gates": routing["gates"],
            "importance": routing["importance"],
            "load": routing["load"],
            "y": y,
            "aux_loss": routing["aux_loss"],
            "expert_gates": routing["expert_gates"],
            "token_index": routing["token_index"],
            "expert_index": routing["expert_index"],
        }
        for name, grad in zip(names, grads):
            res["grad/" + name] = tf.reshape(grad, data[name].shape)
        results[mode] = {k: np.asarray(v) for k, v in res.items()}
    return results


_OURS = {}


def ours(case, data):
    key = (case["name"], digest(data))
    if key not in _OURS:
        _OURS[key] = _ours(case, data)
    return _OURS[key]


def _is_noise_kernel(name):
    return name.endswith("noise_kernel")


def check(case, ref, mine, mode, source):
    what = "%s [%s, %s]" % (case["name"], mode, source)
    # Same experts selected for every token, exactly.
    np.testing.assert_array_equal(
        mine["gates"] != 0, ref["gates"] != 0,
        err_msg="%s gates: different support (experts selected)" % what)
    per_token = min(case["k"], case["n1"])
    if oracle.is_hierarchical(case):
        per_token *= min(case["group_k"], case["n2"])
    np.testing.assert_array_equal(np.sum(mine["gates"] != 0, axis=1),
                                  per_token, err_msg=what + " gates")
    for name in ("gates", "importance", "load", "y", "aux_loss",
                 "expert_gates"):
        assert_matches(mine[name], ref[name], FORWARD,
                       what="%s %s" % (what, name))
    # The original's expert_to_identifiers, concatenated over experts: the
    # tokens each expert received, in order.
    np.testing.assert_array_equal(
        mine["token_index"], ref["token_index"].astype(np.int64),
        err_msg=what + " token_index vs the original's "
        "expert_to_identifiers")
    np.testing.assert_array_equal(
        mine["expert_index"],
        np.repeat(np.arange(mine["gates"].shape[1]),
                  np.sum(ref["gates"] != 0, axis=0)),
        err_msg=what + " expert_index")
    floor = grad_floor(ref, "grad/")
    for name in oracle.hier_weight_names(case):
        key = "grad/" + name
        assert_matches(mine[key], ref[key], GRADIENT, floor=floor,
                       nan_ok=(mode == "infer" and _is_noise_kernel(name)),
                       what="%s d(loss)/d(%s)" % (what, name))


# --------------------------------------------------------------------------
# Tests.
# --------------------------------------------------------------------------


class HierarchicalParityFixtureTest(testing.TestCase):
    """keras_moe against the committed fixtures (always runs)."""

    @parameterized.named_parameters(*PARAMS)
    def test_moe(self, case_name, mode):
        case, data, results = fixture(case_name)
        check(case, results[mode], ours(case, data)[mode], mode, "fixture")

    @parameterized.named_parameters(*CASE_PARAMS)
    def test_fixture_is_current(self, case_name):
        # The stored case and data are what tests/oracle.py defines now;
        # otherwise regenerate with tools/make_hierarchical_fixtures.py.
        case, data, _ = fixture(case_name)
        self.assertEqual(case, oracle.HIER_CASES_BY_NAME[case_name])
        expected = oracle.make_hier_case_data(case)
        self.assertEqual(sorted(data), sorted(expected))
        for key in expected:
            np.testing.assert_array_equal(data[key], expected[key],
                                          err_msg=key)

    def test_fixture_cases_cover_the_edges(self):
        # Several datashards, k = 1 and k = n at each level, noisy and
        # clean, hidden layers, shadow_xs, an empty group.
        cases = [fixture(c["name"])[0] for c in oracle.HIER_CASES]
        hier = [c for c in cases if oracle.is_hierarchical(c)]
        self.assertTrue(any(len(c["shards"]) == 1 for c in hier))
        self.assertTrue(any(len(c["shards"]) >= 3 for c in hier))
        for noisy in (True, False):
            sub = [c for c in hier if c["noisy"] == noisy]
            self.assertTrue(any(c["k"] == 1 for c in sub))
            self.assertTrue(any(c["k"] == c["n1"] for c in sub))
            self.assertTrue(any(c["group_k"] == 1 for c in sub))
            self.assertTrue(any(c["group_k"] == c["n2"] for c in sub))
            self.assertTrue(any(c["gating_inputs"] for c in sub))
        self.assertTrue(any(c["hidden"] for c in hier))
        self.assertTrue(any(c["empty_group"] for c in hier))
        # The empty group really is empty.
        case, _, results = fixture("h_empty_group")
        for mode, _ in oracle.MODES:
            gates = results[mode]["gates"]
            self.assertEqual(np.count_nonzero(gates[:, -case["n2"]:]), 0)
            self.assertGreater(np.count_nonzero(gates[:, :-case["n2"]]), 0)


class HierarchicalParityLiveOracleTest(testing.TestCase):
    """keras_moe against the original run now (skipped when absent)."""

    def setUp(self):
        super().setUp()
        if oracle.find_original() is None:
            self.skipTest(NO_ORIGINAL)

    @parameterized.named_parameters(*LIVE_PARAMS)
    def test_moe(self, case_name):
        case, data, results = live(case_name)
        for mode, _ in oracle.MODES:
            check(case, results[mode], ours(case, data)[mode], mode,
                  "live oracle")

    @parameterized.named_parameters(*LIVE_PARAMS)
    def test_fixture_matches_live_oracle(self, case_name):
        # The committed fixtures are what the original computes here.
        case, data, results = live(case_name)
        _, _, fresults = fixture(case_name)
        for mode, _ in oracle.MODES:
            assert_fixture_matches_live(case_name, mode, results[mode],
                                        fresults[mode])
