"""How the parity tests (tests/test_parity.py) compare keras_moe with the
original: tolerances, the comparison of each kind of result, and the
reference data of a harness suite (committed fixtures or the original run
live, each read or run once per case)."""

import hashlib

import numpy as np
import pytest

from numerics import FORWARD, GRADIENT, assert_close, max_abs
from reference_harness import fixtures, flat, hierarchical, original

NO_ORIGINAL = (
    "the original expert_utils_2017.py was not found: set "
    "KERAS_MOE_ORIGINAL to its path or place it at "
    "<repo>/../shared/reference/expert_utils_2017.py"
)


def require_original():
    """The original module; skips the test where it is not found."""
    path = original.find_original()
    if path is None:
        pytest.skip(NO_ORIGINAL)
    return original.load_original(path)


# --------------------------------------------------------------------------
# Tolerances.
# --------------------------------------------------------------------------


def grad_floor(results, prefix, terms=0.0):
    """The scale below which a gradient named `prefix*` is rounding of zero.

    The gradients of one loss are computed from the same upstream gradients,
    so an entry that is mathematically zero rounds at the scale of the
    largest of them; `terms` is an a-priori bound for a loss whose gradients
    may all be zero (e.g. the gating alone with k = 1, where every gradient
    flows through a softmax over one logit).
    """
    g = [max_abs(v) for k, v in results.items() if k.startswith(prefix)]
    return max(g + [float(terms)])


def assert_matches(actual, desired, depth, floor=0.0, nan_ok=False,
                   what=""):
    """`numerics.assert_close`, with the documented deviation: where
    `desired` is NaN (allowed only with `nan_ok`), `actual` must be finite
    and exactly zero."""
    actual = np.asarray(actual, np.float64)
    desired = np.asarray(desired, np.float64)
    assert actual.shape == desired.shape, (
        "%s: shape %s, reference %s" % (what, actual.shape, desired.shape))
    nan = np.isnan(desired)
    if nan.any():
        assert nan_ok, "%s: the reference has NaN where none is expected" % (
            what,)
        bad = ~(np.isfinite(actual[nan]) & (actual[nan] == 0))
        assert not bad.any(), (
            "%s: where the original's gradient is NaN (the documented "
            "deviation) ours must be exactly zero; got %s" %
            (what, actual[nan][bad][:8]))
    assert_close(actual[~nan], desired[~nan], depth, floor=floor, what=what)


def assert_fixture_matches_live(case_name, mode, live_results,
                                stored_results, gradient_terms=None):
    """The committed fixture of one case and mode is what the original
    computes here: same keys, same NaN positions, the values within the
    parity tolerances. `gradient_terms` maps a gradient prefix ("grad",
    "gating_grad") to its `grad_floor` terms."""
    gradient_terms = gradient_terms or {}
    assert sorted(live_results) == sorted(stored_results)
    for key, ref in live_results.items():
        stored = stored_results[key]
        grad = "grad" in key
        what = "%s [%s] fixture vs live %s" % (case_name, mode, key)
        nan = np.isnan(ref)
        np.testing.assert_array_equal(np.isnan(stored), nan,
                                      err_msg=what + ": NaN positions")
        floor = (grad_floor(live_results, key.split("/")[0] + "/",
                            gradient_terms.get(key.split("/")[0], 0.0))
                 if grad else 0.0)
        assert_matches(stored[~nan], ref[~nan],
                       GRADIENT if grad else FORWARD, floor=floor, what=what)


# --------------------------------------------------------------------------
# The comparisons: check(case, data, ref, mine, mode, source) asserts that
# `mine` (keras_moe's results of one mode) matches `ref` (the original's).
# --------------------------------------------------------------------------


def _support(mine, ref, what):
    # Same experts selected for every token, exactly.
    np.testing.assert_array_equal(
        mine != 0, ref != 0,
        err_msg="%s gates: different support (experts selected)" % what)


def check_flat_moe(case, data, ref, mine, mode, source):
    """MixtureOfExperts against the original's LocalMixtureOfExperts:
    gates (times the gate multiplier), load, importance, outputs, aux loss,
    and the gradients w.r.t. every weight (flat.weight_names)."""
    what = "%s [%s, %s]" % (case["name"], mode, source)
    ref_gates = ref["gates"]
    if case["gate_multiplier"]:
        ref_gates = ref_gates * data["multiplier"][:, None]
    _support(mine["gates"], ref_gates, what)
    assert_matches(mine["gates"], ref_gates, FORWARD, what=what + " gates")
    for name in ("load", "importance", "y", "aux_loss"):
        assert_matches(mine[name], ref[name], FORWARD,
                       what="%s %s" % (what, name))
    floor = grad_floor(ref, "grad/")
    for name in flat.weight_names(case):
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


def check_flat_gating(case, data, ref, mine, mode, source):
    """NoisyTopKGating alone: gates (k per token), load, and the gradients
    of the gating-alone loss w.r.t. the gate (and noise) kernels."""
    what = "%s [%s, %s] NoisyTopKGating" % (case["name"], mode, source)
    _support(mine["gates"], ref["gates"], what)
    k = min(case["k"], case["num_experts"])
    np.testing.assert_array_equal(np.sum(mine["gates"] != 0, axis=1), k)
    for name in ("gates", "load"):
        assert_matches(mine[name], ref[name], FORWARD,
                       what="%s %s" % (what, name))
    floor = grad_floor(ref, "gating_grad/", gating_gradient_terms(case, data))
    for name in flat.gating_weight_names(case):
        key = "gating_grad/" + name
        assert_matches(mine[key], ref[key], GRADIENT, floor=floor,
                       nan_ok=(mode == "infer" and name == "noise_kernel"),
                       what="%s d(gating loss)/d(%s)" % (what, name))


def check_hierarchical(case, data, ref, mine, mode, source):
    """HierarchicalMixtureOfExperts (or MixtureOfExperts) against the
    original's DistributedMixtureOfExperts: combined gates, importance,
    load, outputs, aux loss, expert_to_gates and expert_to_identifiers, and
    the gradients (hierarchical.weight_names)."""
    what = "%s [%s, %s]" % (case["name"], mode, source)
    per_token = min(case["k"], hierarchical.primary_experts(case))
    if hierarchical.is_hierarchical(case):
        per_token *= min(case["group_k"], case["experts_per_group"])
    _support(mine["gates"], ref["gates"], what)
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
    for name in hierarchical.weight_names(case):
        key = "grad/" + name
        assert_matches(mine[key], ref[key], GRADIENT, floor=floor,
                       nan_ok=(mode == "infer" and
                               name.endswith("noise_kernel")),
                       what="%s d(loss)/d(%s)" % (what, name))


def check_embedding(case, data, ref, mine, mode, source):
    """ShardedEmbedding against ParallelEmbeddingLookup: the lookups
    exactly (a lookup copies rows), the table's gradient."""
    assert sorted(mine) == sorted(ref)
    for key in ref:
        if key.startswith("emb_"):
            np.testing.assert_array_equal(mine[key], ref[key], err_msg=key)
        else:
            assert_close(mine[key], ref[key], GRADIENT, what=key)


def check_softmax(case, data, ref, mine, mode, source):
    """SampledSoftmaxLoss against SampledSoftmaxLoss and
    ParallelSampledSoftmaxLoss: per-example losses, the weighted total, the
    gradients w.r.t. the class table and the features."""
    assert sorted(mine) == sorted(ref)
    for key in ref:
        depth = GRADIENT if key.startswith("grad/") else FORWARD
        assert_close(mine[key], ref[key], depth,
                     what=f"{case['name']} [{source}] {key}")


# --------------------------------------------------------------------------
# Reference data.
# --------------------------------------------------------------------------


def digest(data):
    """A key for a dict of arrays (to cache results per case and data)."""
    h = hashlib.sha1()
    for key in sorted(data):
        h.update(key.encode())
        h.update(np.ascontiguousarray(data[key], np.float32).tobytes())
    return h.hexdigest()


class Reference:
    """The reference data of one harness suite (reference_harness.flat,
    .hierarchical, .embedding_softmax): `reference(source, case_name)` is
    `(case, data, {group: results})` from the committed fixtures
    (`source="fixture"`, read once; a missing case is an error naming the
    tool that regenerates the file) or from the original run now
    (`source="live"`, once per case; skipped where it is not found)."""

    def __init__(self, suite):
        self.suite = suite
        self._file = fixtures.FixtureFile(suite.FIXTURES)
        self._live = {}

    def fixture(self, case_name):
        got = self._file.get(case_name)
        if got is None:
            raise AssertionError(
                "case %r is missing from %s; regenerate it with %s "
                "--original PATH" % (case_name, self.suite.FIXTURES,
                                     self.suite.TOOL))
        return got

    def live(self, case_name):
        if case_name not in self._live:
            module = require_original()
            case = self.suite.CASES_BY_NAME[case_name]
            data = self.suite.make_data(case)
            self._live[case_name] = (
                case, data, self.suite.run_original(module, case, data))
        return self._live[case_name]

    def __call__(self, source, case_name):
        if source == "fixture":
            return self.fixture(case_name)
        return self.live(case_name)
