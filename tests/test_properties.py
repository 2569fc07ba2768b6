"""Property tests of `MixtureOfExperts` routing and combining.

Each test runs in the four (noisy_gating, training) modes; in each, hypothesis
draws the sizes (tokens 0..20, d, num_experts, k, hidden sizes, output_dim),
an optional mask, the inputs, the noise draw and random gate/noise/expert
weights. Outputs are checked against a naive dense reference,
`y[b] = sum_i gates[b, i] * expert_i(x[b])`, with every expert run on every
row through `layer.experts.call_expert`.
"""

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import numpy as np
import pytest

import keras_moe
from balance_reference import cv_squared
from numerics import (ELEMENTWISE, FORWARD, assert_close, max_abs,
                      tolerance)

# Each test is parameterized over the 4 (noisy_gating, training) modes, so
# every mode gets its own examples; 12 a mode keeps the file well under 60 s.
SETTINGS = hypothesis.settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    print_blob=True,
)


MODES = [
    pytest.param(noisy, training, id=f"noisy={noisy}-training={training}")
    for noisy in (False, True)
    for training in (False, True)
]


@st.composite
def moe_cases(draw, noisy_gating, training):
    num_experts = draw(st.integers(1, 8))
    case = dict(
        tokens=draw(st.integers(0, 20)),
        d=draw(st.integers(1, 8)),
        num_experts=num_experts,
        k=draw(st.integers(1, num_experts)),
        hidden_sizes=tuple(
            draw(st.lists(st.integers(1, 6), min_size=0, max_size=2))
        ),
        output_dim=draw(st.one_of(st.none(), st.integers(1, 5))),
        noisy_gating=noisy_gating,
        training=training,
        use_mask=draw(st.booleans()),
        weight_seed=draw(st.integers(0, 2**31 - 1)),
    )
    shape = (case["tokens"], case["d"])
    case["x"] = draw(
        hnp.arrays(
            np.float32,
            shape,
            elements=st.floats(-1.0, 1.0, width=32, allow_subnormal=False),
        )
    )
    case["noise"] = draw(
        hnp.arrays(
            np.float32,
            (case["tokens"], num_experts),
            elements=st.floats(-3.0, 3.0, width=32, allow_subnormal=False),
        )
    )
    case["mask"] = draw(hnp.arrays(np.bool_, (case["tokens"],)))
    return case


def _build_layer(case):
    layer = keras_moe.MixtureOfExperts(
        case["num_experts"],
        k=case["k"],
        output_dim=case["output_dim"],
        hidden_sizes=case["hidden_sizes"],
        noisy_gating=case["noisy_gating"],
        gate_initializer="random_normal",
        seed=0,
    )
    layer.build((None, case["d"]))
    # Random (non-tied) gate and noise kernels, bounded so that no softmax
    # can underflow: |x| <= 1 and |w| <= 0.5 give |clean logit| <= 4, a
    # noise stddev <= softplus(4) + eps < 4.1 and, with |noise| <= 3,
    # |noisy logit| < 17: top-k gates differ by at most exp(34).
    rng = np.random.RandomState(case["weight_seed"])
    for variable in layer.gating.weights:
        variable.assign(
            rng.uniform(-0.5, 0.5, size=variable.shape).astype("float32")
        )
    for variable in layer.experts.kernels:
        variable.assign(
            rng.normal(scale=0.5, size=variable.shape).astype("float32")
        )
    return layer


def _run(case):
    layer = _build_layer(case)
    mask = case["mask"] if case["use_mask"] else None
    outputs, routing = layer(
        case["x"],
        training=case["training"],
        mask=mask,
        noise=case["noise"],
        return_routing=True,
    )
    routing = {name: np.asarray(value) for name, value in routing.items()}
    return layer, np.asarray(outputs), routing


def _active(case):
    """Which tokens are routed at all (not masked out)."""
    if case["use_mask"]:
        return case["mask"]
    return np.ones((case["tokens"],), bool)


@pytest.mark.parametrize("noisy_gating, training", MODES)
@hypothesis.given(data=st.data())
@SETTINGS
def test_gates_load_importance_and_aux_loss(noisy_gating, training, data):
    case = data.draw(moe_cases(noisy_gating, training))
    layer, _, routing = _run(case)
    gates, load = routing["gates"], routing["load"]
    n, k = case["num_experts"], case["k"]
    active = _active(case)
    num_active = int(active.sum())

    # Gates: at most (here, with moderate logits, exactly) min(k, n)
    # non-zeros a routed row, non-negative, summing to 1; masked rows zero.
    assert gates.shape == (case["tokens"], n)
    assert gates.dtype == np.float32
    assert np.all(gates >= 0.0), gates
    nonzeros = np.count_nonzero(gates, axis=1)
    assert np.all(nonzeros <= min(k, n)), nonzeros
    np.testing.assert_array_equal(nonzeros[active], min(k, n))
    assert_close(gates[active].sum(axis=1), np.ones(num_active), FORWARD,
                 what="each routed row's sum of gates")
    np.testing.assert_array_equal(gates[~active], 0.0)
    counts = np.count_nonzero(gates, axis=0)
    np.testing.assert_array_equal(routing["part_sizes"], counts)

    # Importance is the column sum of the gates.
    assert_close(routing["importance"], gates.sum(axis=0), ELEMENTWISE,
                 what="importance")

    # Load: non-negative, at most tokens * n in all (up to rounding at the
    # scale of the sum, of probabilities <= 1).
    assert load.shape == (n,) and load.dtype == np.float32
    assert np.all(load >= 0.0), load
    rounding = tolerance(FORWARD) * max(num_active, 1)
    assert load.sum() <= num_active * n + rounding * n, (load, num_active)
    if not (noisy_gating and k < n):
        # The true count of tokens per expert.
        np.testing.assert_array_equal(load, counts.astype(np.float32))
    else:
        # The smooth estimate: each token adds a probability <= 1.
        assert np.all(load <= num_active + rounding), load
        if not training and _no_boundary_ties(layer, case, k):
            # Zero noise: the estimate is the count (ties between the k-th
            # and (k+1)-th logit would count 0.5; the check excludes them).
            # Each count is a sum of probabilities <= 1: the floor.
            assert_close(load, counts.astype(np.float64), FORWARD,
                         floor=1.0, what="smooth load at zero noise")

    # The balancing loss is loss_coef * (cv^2(importance) + cv^2(load)).
    expected = layer.loss_coef * (
        cv_squared(routing["importance"]) + cv_squared(load)
    )
    # Float32 against float64 from the same importance and load. CV^2 is
    # computed from x / mean, of order 1: the floor, for the balanced cases
    # whose CV^2 is 0 in float32 and ~1e-20 (the original's epsilons) in
    # float64.
    assert_close(routing["aux_loss"], expected, FORWARD,
                 floor=layer.loss_coef, what="aux_loss")
    assert len(layer.losses) == 1
    # The same number, reported twice.
    np.testing.assert_array_equal(np.asarray(layer.losses[0]),
                                  routing["aux_loss"])


@pytest.mark.parametrize("noisy_gating, training", MODES)
@hypothesis.given(data=st.data())
@SETTINGS
def test_output_matches_dense_reference(noisy_gating, training, data):
    case = data.draw(moe_cases(noisy_gating, training))
    layer, outputs, routing = _run(case)
    gates = routing["gates"]
    output_dim = case["output_dim"] or case["d"]
    assert outputs.shape == (case["tokens"], output_dim)
    expected = np.zeros((case["tokens"], output_dim), np.float64)
    terms = 0.0  # the largest gate * expert output the sum is made of
    for i in range(case["num_experts"]):
        expert_out = np.asarray(layer.experts.call_expert(case["x"], i))
        assert expert_out.shape == (case["tokens"], output_dim)
        term = gates[:, i : i + 1].astype(np.float64) * expert_out
        terms = max(terms, max_abs(term))
        expected += term
    # A row's experts may cancel: the floor is the terms' magnitude.
    assert_close(outputs, expected, FORWARD, floor=terms,
                 what="outputs vs the dense reference")


def _no_boundary_ties(layer, case, k):
    """Whether no routed row ties its k-th and (k+1)-th clean logits."""
    x = case["x"][_active(case)]
    logits = x @ layer.gating.gate_kernel.numpy()
    if logits.shape[0] == 0:
        return True
    ordered = -np.sort(-logits, axis=1)
    return bool(np.all(ordered[:, k - 1] - ordered[:, k] > 1e-4))
