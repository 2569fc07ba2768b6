"""What the case descriptions of every suite share.

A case is a flat dict of JSON values named after the keras_moe layers'
arguments (`num_experts`, `k`, `hidden_sizes`, `noisy_gating`, ...) plus
the data's own sizes (`tokens`, `datashards`); sequences are tuples. Its
data is drawn from a RandomState seeded by its name, so the name alone
fixes the numbers.
"""

import zlib

import numpy as np

# How a case runs: (results group, `training` flag).
MODES = (("train", True), ("infer", False))


def describe(defaults, name, kwargs):
    """`defaults` updated with `kwargs` (unknown keys are an error), named
    `name`, lists made tuples."""
    unknown = set(kwargs) - set(defaults)
    assert not unknown, unknown
    case = dict(defaults)
    case.update(kwargs)
    case["name"] = name
    return {key: tuple(val) if isinstance(val, list) else val
            for key, val in case.items()}


def by_name(cases):
    return {c["name"]: c for c in cases}


def rng(case):
    """The case's RandomState, seeded by its name."""
    seed = zlib.crc32(case["name"].encode()) & 0x7FFFFFFF
    return np.random.RandomState(seed)


def f32(a):
    return np.asarray(a, np.float32)


def output_dim(case):
    """The MoE's output width (`output_dim`, else its `input_dim`)."""
    return (case["output_dim"] if case["output_dim"] is not None
            else case["input_dim"])


def layer_sizes(case):
    """The experts' layer widths: input, hidden_sizes, output."""
    return [case["input_dim"]] + list(case["hidden_sizes"]) + [
        output_dim(case)]


def num_layers(case):
    return len(layer_sizes(case)) - 1
