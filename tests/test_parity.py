"""Numerical parity of keras_moe with the original 2017 `expert_utils.py`.

Every case of `tests/oracle.py` runs in training and in inference, and
keras_moe is compared against

* the committed fixtures `tests/fixtures/parity.npz` (always), written by
  `tools/make_parity_fixtures.py` from the original; and
* the original itself, run live through the oracle harness, when it is found at
  `$KERAS_MOE_ORIGINAL` or `<repo>/../shared/reference/expert_utils_2017.py`
  (skipped otherwise).

Quantities: the gating network's gates and load (`NoisyTopKGating` alone, and
inside the MoE), the MoE's gates (times `gate_multiplier`), importance, load,
outputs, aux loss, the gradients of `sum(y**2) + aux_loss` w.r.t. every weight
(expert kernels stacked over experts), and the gradients of the gating-alone
loss `sum(gates * C) + sum(load * L)`.

Tolerances: the rule of tests/numerics.py, each tensor within
`tol * scale` of the reference: forward quantities at depth FORWARD,
gradients at depth GRADIENT. A gradient's scale is at least the largest
gradient of the case and mode (the float32 rounding the original leaves in
mathematically zero gradients is relative to that), and for the gating-alone
loss at least `|x|^T (|C| + |L|)`, since with k = 1 all its gradients are
zero (a softmax over one logit) and the reference is rounding noise.

Known, documented deviation: in inference the original's gradient w.r.t. the
noise kernel is NaN (0 * inf inside the erf gradient, the noise stddev being
multiplied by `train` = 0); keras_moe gives exactly zero there. The tests
assert that NaNs occur only there, and that ours is finite and exactly zero.
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


PARAMS = [
    dict(testcase_name="%s_%s" % (c["name"], mode), case_name=c["name"],
         mode=mode)
    for c in oracle.CASES for mode, _ in oracle.MODES
]
CASE_PARAMS = [dict(testcase_name=c["name"], case_name=c["name"])
               for c in oracle.CASES]

# --------------------------------------------------------------------------
# Reference data: committed fixtures and the live oracle (both cached).
# --------------------------------------------------------------------------

fixture = FixtureFile(oracle.DEFAULT_FIXTURES, oracle.unpack,
                      "tools/make_parity_fixtures.py")
live = LiveOriginal(oracle.CASES_BY_NAME, oracle.make_case_data,
                    oracle.run_oracle)


# --------------------------------------------------------------------------
# keras_moe on the same data (cached by case and data digest).
# --------------------------------------------------------------------------


def _num_layers(case):
    return len(oracle.layer_sizes(case)) - 1


def _ours_moe(case, data):
    x = tf.constant(data["x"])
    kwargs = {}
    if case["gating_inputs"]:
        kwargs["gating_inputs"] = tf.constant(data["gating_x"])
    if case["multiplier"]:
        kwargs["gate_multiplier"] = tf.constant(data["multiplier"])
    layer = keras_moe.MixtureOfExperts(
        num_experts=case["n"],
        k=case["k"],
        output_dim=case["output_dim"],
        hidden_sizes=case["hidden"],
        autoscale=case["autoscale"],
        noisy_gating=case["noisy"],
        noise_epsilon=case["noise_epsilon"],
        loss_coef=case["loss_coef"],
    )
    layer(x, training=False, **kwargs)  # build
    weights = {"gate_kernel": layer.gating.gate_kernel}
    if case["noisy"]:
        weights["noise_kernel"] = layer.gating.noise_kernel
    for l in range(_num_layers(case)):
        weights["kernel_%d" % l] = layer.experts.kernels[l]
    names = oracle.weight_names(case)
    for name in names:
        weights[name].assign(data[name])
    if case["noisy"]:
        kwargs["noise"] = tf.constant(data["noise"])

    results = {}
    for mode, training in oracle.MODES:
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


def _ours_gating(case, data):
    gx = tf.constant(data["gating_x"] if case["gating_inputs"] else data["x"])
    layer = keras_moe.NoisyTopKGating(
        case["n"], k=case["k"], noisy_gating=case["noisy"],
        noise_epsilon=case["noise_epsilon"])
    layer(gx, training=False)  # build
    weights = {"gate_kernel": layer.gate_kernel}
    if case["noisy"]:
        weights["noise_kernel"] = layer.noise_kernel
    names = oracle.gating_weight_names(case)
    for name in names:
        weights[name].assign(data[name])
    kwargs = {"noise": tf.constant(data["noise"])} if case["noisy"] else {}
    coef_gates = tf.constant(data["gating_coef_gates"])
    coef_load = tf.constant(data["gating_coef_load"])
    results = {}
    for mode, training in oracle.MODES:
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


_OURS = {}


def ours(kind, case, data):
    key = (kind, case["name"], digest(data))
    if key not in _OURS:
        fn = _ours_moe if kind == "moe" else _ours_gating
        _OURS[key] = fn(case, data)
    return _OURS[key]


# --------------------------------------------------------------------------
# Comparison.
# --------------------------------------------------------------------------


def check_moe(case, data, ref, mine, mode, source):
    what = "%s [%s, %s]" % (case["name"], mode, source)
    ref_gates = ref["gates"]
    if case["multiplier"]:
        ref_gates = ref_gates * data["multiplier"][:, None]
    # Same experts selected for every token, exactly.
    np.testing.assert_array_equal(
        mine["gates"] != 0, ref_gates != 0,
        err_msg="%s gates: different support (experts selected)" % what)
    assert_matches(mine["gates"], ref_gates, FORWARD, what=what + " gates")
    for name in ("load", "importance", "y", "aux_loss"):
        assert_matches(mine[name], ref[name], FORWARD,
                       what="%s %s" % (what, name))
    floor = grad_floor(ref, "grad/")
    for name in oracle.weight_names(case):
        key = "grad/" + name
        assert_matches(mine[key], ref[key], GRADIENT, floor=floor,
                       nan_ok=(mode == "infer" and name == "noise_kernel"),
                       what="%s d(loss)/d(%s)" % (what, name))


def gating_gradient_terms(case, data):
    """The magnitude of the terms the gating-alone loss's kernel gradients
    are summed from: `|x|^T (|C| + |L|)`, x the gate's input, C and L the
    loss's coefficients of the gates and the load. With k = 1 every such
    gradient is mathematically zero (a softmax over one logit) and the
    reference is float32 rounding at this scale."""
    gx = data["gating_x"] if case["gating_inputs"] else data["x"]
    upstream = (np.abs(data["gating_coef_gates"]) +
                np.abs(data["gating_coef_load"])[None, :])
    return float(np.max(np.abs(gx).T.astype(np.float64) @ upstream))


def check_gating(case, data, ref, mine, mode, source):
    what = "%s [%s, %s] NoisyTopKGating" % (case["name"], mode, source)
    np.testing.assert_array_equal(
        mine["gates"] != 0, ref["gates"] != 0,
        err_msg="%s gates: different support (experts selected)" % what)
    k = min(case["k"], case["n"])
    np.testing.assert_array_equal(np.sum(mine["gates"] != 0, axis=1), k)
    for name in ("gates", "load"):
        assert_matches(mine[name], ref[name], FORWARD,
                       what="%s %s" % (what, name))
    floor = grad_floor(ref, "gating_grad/", gating_gradient_terms(case, data))
    for name in oracle.gating_weight_names(case):
        key = "gating_grad/" + name
        assert_matches(mine[key], ref[key], GRADIENT, floor=floor,
                       nan_ok=(mode == "infer" and name == "noise_kernel"),
                       what="%s d(gating loss)/d(%s)" % (what, name))


# --------------------------------------------------------------------------
# Tests.
# --------------------------------------------------------------------------


class ParityFixtureTest(testing.TestCase):
    """keras_moe against the committed fixtures (always runs)."""

    @parameterized.named_parameters(*PARAMS)
    def test_moe(self, case_name, mode):
        case, data, results = fixture(case_name)
        check_moe(case, data, results[mode], ours("moe", case, data)[mode],
                  mode, "fixture")

    @parameterized.named_parameters(*PARAMS)
    def test_gating(self, case_name, mode):
        case, data, results = fixture(case_name)
        check_gating(case, data, results[mode], ours("gating", case, data)[mode],
                     mode, "fixture")

    @parameterized.named_parameters(*CASE_PARAMS)
    def test_fixture_is_current(self, case_name):
        # The stored case and data are what tests/oracle.py defines now;
        # otherwise regenerate with tools/make_parity_fixtures.py.
        case, data, _ = fixture(case_name)
        self.assertEqual(case, oracle.CASES_BY_NAME[case_name])
        expected = oracle.make_case_data(case)
        self.assertEqual(sorted(data), sorted(expected))
        for key in expected:
            np.testing.assert_array_equal(data[key], expected[key],
                                          err_msg=key)


class ParityIsSharpTest(testing.TestCase):
    """The parity comparisons, under the same tolerances, fail on the
    smallest defects that matter (tests/numerics.py)."""

    @parameterized.named_parameters(
        dict(testcase_name="moe_" + mode, mode=mode)
        for mode, _ in oracle.MODES)
    def test_an_expert_kernel_off_by_1e_3_fails(self, mode):
        case, data, results = fixture("hidden_autoscale")
        check_moe(case, data, results[mode],
                  ours("moe", case, data)[mode], mode, "fixture")
        # The expert that receives the most tokens, its last layer scaled.
        gates = results[mode]["gates"]
        busiest = int(np.argmax(np.sum(gates != 0, axis=0)))
        name = oracle.weight_names(case)[-1]
        defective = dict(data)
        defective[name] = data[name].copy()
        defective[name][busiest] *= np.float32(1 + 1e-3)
        with self.assertRaisesRegex(AssertionError, " y|grad"):
            check_moe(case, data, results[mode],
                      ours("moe", case, defective)[mode], mode, "fixture")

    @parameterized.named_parameters(
        dict(testcase_name="gating_" + mode, mode=mode)
        for mode, _ in oracle.MODES)
    def test_a_gate_kernel_column_off_by_1e_3_fails(self, mode):
        case, data, results = fixture("clean_k2")
        check_gating(case, data, results[mode],
                     ours("gating", case, data)[mode], mode, "fixture")
        defective = dict(data)
        defective["gate_kernel"] = data["gate_kernel"].copy()
        defective["gate_kernel"][:, 0] *= np.float32(1 + 1e-3)
        with self.assertRaisesRegex(AssertionError, "gates|load|grad"):
            check_gating(case, data, results[mode],
                         ours("gating", case, defective)[mode], mode,
                         "fixture")


class ParityLiveOracleTest(testing.TestCase):
    """keras_moe against the original run now (skipped when absent)."""

    def setUp(self):
        super().setUp()
        if oracle.find_original() is None:
            self.skipTest(NO_ORIGINAL)

    @parameterized.named_parameters(*PARAMS)
    def test_moe(self, case_name, mode):
        case, data, results = live(case_name)
        check_moe(case, data, results[mode], ours("moe", case, data)[mode],
                  mode, "live oracle")

    @parameterized.named_parameters(*PARAMS)
    def test_gating(self, case_name, mode):
        case, data, results = live(case_name)
        check_gating(case, data, results[mode], ours("gating", case, data)[mode],
                     mode, "live oracle")

    @parameterized.named_parameters(*PARAMS)
    def test_fixture_matches_live_oracle(self, case_name, mode):
        # The committed fixtures are what the original computes here.
        case, data, results = live(case_name)
        _, _, fresults = fixture(case_name)
        assert_fixture_matches_live(
            case_name, mode, results[mode], fresults[mode],
            {"gating_grad": gating_gradient_terms(case, data)})
