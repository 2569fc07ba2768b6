"""The one NumPy reference of the squared coefficient of variation that the
tests check `keras_moe.cv_squared` and the balancing loss against
(test_balance.py, test_balancing.py)."""

import numpy as np


def cv_squared(x):
    """The original `CVSquared` in float64: the population variance of all
    entries of `x` (any shape) over their squared mean, with the original's
    epsilons, so 0 for an empty or all-zero `x`."""
    x = np.asarray(x, np.float64).ravel()
    size = x.size + 1e-10
    mean = x.sum() / size
    variance = ((x - mean) ** 2).sum() / size
    return variance / (mean**2 + 1e-10)
