"""How the parity tests compare keras_moe with the original: tolerances,
the comparison itself, and the cached reference data (committed fixtures
or the original run live)."""

import hashlib

import numpy as np
import pytest

import oracle

from numerics import FORWARD, GRADIENT, assert_close, max_abs

NO_ORIGINAL = (
    "the original expert_utils_2017.py was not found: set KERAS_MOE_ORIGINAL "
    "to its path or place it at <repo>/../shared/reference/expert_utils_2017.py"
)


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


def digest(data):
    """A key for a dict of arrays (to cache results per case and data)."""
    h = hashlib.sha1()
    for key in sorted(data):
        h.update(key.encode())
        h.update(np.ascontiguousarray(data[key], np.float32).tobytes())
    return h.hexdigest()


class FixtureFile:
    """The cases of one committed .npz fixture file, read once.

    `FixtureFile(path, unpack, tool)(case_name)` is what `unpack(npz,
    case_name, meta)` returns for it; a missing case is an error that names
    the tool that regenerates the file.
    """

    def __init__(self, path, unpack, tool):
        self._path, self._unpack, self._tool = path, unpack, tool
        self._npz = self._meta = None

    def __call__(self, case_name):
        if self._npz is None:
            self._npz = np.load(self._path)
            self._meta = oracle.read_meta(self._npz)
        got = self._unpack(self._npz, case_name, self._meta)
        if got is None:
            raise AssertionError(
                "case %r is missing from %s; regenerate it with %s "
                "--original PATH" % (case_name, self._path, self._tool))
        return got


class LiveOriginal:
    """The original run now on a case, once per case.

    `LiveOriginal(cases_by_name, make_data, run)(case_name)` is
    `(case, data, run(module, case, data))`; it skips the test where the
    original is not found.
    """

    def __init__(self, cases_by_name, make_data, run):
        self._cases, self._make_data, self._run = (
            cases_by_name, make_data, run)
        self._results = {}

    def __call__(self, case_name):
        if case_name not in self._results:
            path = oracle.find_original()
            if path is None:
                pytest.skip(NO_ORIGINAL)
            module = oracle.load_original(path)
            case = self._cases[case_name]
            data = self._make_data(case)
            self._results[case_name] = (case, data,
                                        self._run(module, case, data))
        return self._results[case_name]


_EMBEDDING_SOFTMAX = {}
_embedding_softmax_live = LiveOriginal(
    oracle.EMBEDDING_SOFTMAX_CASES_BY_NAME,
    oracle.make_embedding_case_data,
    oracle.run_embedding_softmax_oracle,
)


def embedding_softmax_reference(source, name):
    """(case, data, ref) of a sharded embedding / sampled softmax case,
    from the fixtures (`source="fixture"`) or from the live original."""
    key = (source, name)
    if key not in _EMBEDDING_SOFTMAX:
        if source == "fixture":
            got = oracle.unpack_embedding_softmax(
                np.load(oracle.EMBEDDING_FIXTURES), name)
            assert got is not None, (
                f"case {name!r} is missing from {oracle.EMBEDDING_FIXTURES}; "
                "regenerate it with tools/make_embedding_fixtures.py")
        else:
            got = _embedding_softmax_live(name)
        case, data, results = got
        _EMBEDDING_SOFTMAX[key] = (case, data, results["ref"])
    return _EMBEDDING_SOFTMAX[key]
