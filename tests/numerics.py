"""How the tests compare numbers: one rule, on every x86 CPU, oneDNN on or off.

Two float32 computations of one quantity that differ only in the order of
their sums (Eigen or oneDNN kernels, AVX2 or AVX-512, one device or several
replicas, a `[tokens, d]` batch or any rank, the sparse or the capacity
dispatch, keras_moe or the original) do not agree entry by entry: an entry
that cancels to nearly zero keeps the rounding error of the large terms it
was summed from, so its relative error can be anything, and an entry that is
mathematically zero comes out as rounding noise on one machine and exactly 0
on another. They agree relative to the *scale* of the tensor:

    max|actual - desired| <= tol * scale
    scale = max(max|desired|, floor)
    tol   = depth * UNIT,   UNIT = 16 * float32 eps (1.9e-6)

- `depth` counts the chained stages at which the two computations may round
  differently: each matmul or other reduction, softmax, normalisation. A
  backward pass is about twice its forward. The presets: `ELEMENTWISE` (1),
  `FORWARD` (8: a layer's outputs and routing statistics), `GRADIENT` (16:
  gradients), `STEP` (32: a training step, forward, backward and update,
  compared by the update it made to each weight; n steps: n * STEP).
- `floor` is the magnitude of the terms a reference was computed from, for a
  reference that is mathematically zero or cancels (for example
  `|x|^T @ |upstream gradient|` for a kernel's gradient through a softmax over
  one logit). A reference below `tol * floor` everywhere is float32 rounding
  of zero, and ours may be anything as small, exactly 0 included.

UNIT leaves an order of magnitude over what reordering a reduction of the
lengths in these tests (up to a few thousand terms) changes: the parity
tests, measured with oneDNN on and off, come within 1/20 of their `tol`.
The smallest defects the tests must still catch move a tensor by far more
than the largest `tol` (6.1e-5, at `STEP`): one expert's kernel off by
1e-3 relative moves that expert's outputs and gradients by ~1e-3 of their
scale, a token routed to the wrong expert moves its output by O(1), a
balancing statistic summed over one replica only halves it. Each family of
numeric tests (parity with the original, replica invariance, mask and rank
equivalence, capacity = sparse) has a test that injects such a defect and
shows that `assert_close` then fails.

Exact quantities (expert choices, counts, indices, masks) are compared
exactly, with `np.testing.assert_array_equal`.

To see how close each comparison comes to its tolerance on a machine, set
`KERAS_MOE_CLOSENESS_LOG` to a file: every `assert_close` appends a line
`closeness/tol  depth  what` to it.
"""

import os

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)
UNIT = 16 * EPS32

ELEMENTWISE = 1
FORWARD = 8
GRADIENT = 16
STEP = 32


def tolerance(depth):
    """The relative-to-scale tolerance of a computation `depth` stages deep."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1. Received: depth={depth}")
    return depth * UNIT


def max_abs(a):
    """max |a| over the finite entries of `a` (0.0 if there are none)."""
    a = np.asarray(a, np.float64)
    a = a[np.isfinite(a)]
    return float(np.max(np.abs(a))) if a.size else 0.0


def closeness(actual, desired, floor=0.0):
    """`max|actual - desired| / scale`: what `assert_close` bounds by `tol`.

    NaN in either where the other is not, or a shape mismatch, is infinitely
    far; NaN in both at the same place counts as equal.
    """
    actual = np.asarray(actual, np.float64)
    desired = np.asarray(desired, np.float64)
    if actual.shape != desired.shape:
        return np.inf
    nan_a, nan_d = np.isnan(actual), np.isnan(desired)
    if (nan_a != nan_d).any():
        return np.inf
    a, d = actual[~nan_d], desired[~nan_d]
    if not (np.isfinite(a) == np.isfinite(d)).all() or (
            a[~np.isfinite(a)] != d[~np.isfinite(d)]).any():
        return np.inf
    finite = np.isfinite(d)
    diff = np.max(np.abs(a[finite] - d[finite]), initial=0.0)
    scale = max(max_abs(d), float(floor))
    if diff == 0.0:
        return 0.0
    return diff / scale if scale > 0 else np.inf


def assert_close(actual, desired, depth=FORWARD, floor=0.0, what=""):
    """Assert `max|actual - desired| <= tolerance(depth) * scale` (the rule
    in this module's docstring); `desired` is the reference, and its scale is
    `max(max|desired|, floor)`. Shapes must be equal (no broadcasting)."""
    actual = np.asarray(actual)
    desired = np.asarray(desired)
    assert actual.shape == desired.shape, (
        f"{what}: shape {actual.shape}, reference shape {desired.shape}")
    tol = tolerance(depth)
    got = closeness(actual, desired, floor)
    log = os.environ.get("KERAS_MOE_CLOSENESS_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{got / tol:.4g}\t{depth}\t{what}\n")
    if got <= tol:
        return
    a = np.asarray(actual, np.float64).ravel()
    d = np.asarray(desired, np.float64).ravel()
    with np.errstate(invalid="ignore"):
        worst = int(np.nanargmax(np.abs(a - d))) if a.size else 0
    raise AssertionError(
        f"{what or 'values'}: max|actual - desired| is {got:.3g} of the "
        f"scale {max(max_abs(desired), float(floor)):.3g} (allowed "
        f"{tol:.3g}, depth {depth}); worst entry {worst}: "
        f"{a[worst] if a.size else None!r} vs {d[worst] if d.size else None!r}")
