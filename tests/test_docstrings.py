"""The `Example:` sections of the public docstrings run and print what
they say."""

import doctest

import numpy as np
import pytest

from keras_moe import (
    balance, callbacks, dispatch, experts, gating, grouped_feed_forward,
    heatmap, introspection, moe, xla,
)

MODULES = [
    balance, callbacks, dispatch, experts, gating, grouped_feed_forward,
    heatmap, introspection, moe, xla,
]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(
        module, extraglobs={"np": np}, optionflags=doctest.ELLIPSIS,
        verbose=False,
    )
    assert result.attempted > 0, f"{module.__name__} has no examples"
    assert result.failed == 0
