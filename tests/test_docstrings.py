"""The `Example:` sections of the public docstrings run and print what
they say.

Every module of keras_moe whose docstrings have examples is found here
(a new module cannot be missed), and its examples run here only: no other
test file runs doctests, so each example runs once per test run."""

import doctest
import importlib
import pathlib
import pkgutil
import re

import numpy as np
import pytest

import keras_moe

PACKAGE_DIR = pathlib.Path(keras_moe.__file__).resolve().parent
TESTS_DIR = pathlib.Path(__file__).resolve().parent


def _all_modules():
    """keras_moe and every module under it, imported."""
    names = [keras_moe.__name__] + [
        info.name for info in pkgutil.walk_packages(
            keras_moe.__path__, keras_moe.__name__ + ".")
    ]
    return [importlib.import_module(name) for name in names]


def _has_examples(module):
    # What doctest.testmod runs: the module's own docstrings, not those of
    # what it imports from other modules.
    return any(test.examples for test in doctest.DocTestFinder().find(module))


MODULES = [module for module in _all_modules() if _has_examples(module)]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(
        module, extraglobs={"np": np}, optionflags=doctest.ELLIPSIS,
        verbose=False,
    )
    assert result.attempted > 0, f"{module.__name__} has no examples"
    assert result.failed == 0


def test_every_module_with_examples_is_run():
    """The modules found above are those whose source has a `>>>` line,
    found another way: by reading every .py file of the package."""
    prompt = re.compile(r"^\s*>>> ", re.MULTILINE)
    with_prompts = set()
    for path in PACKAGE_DIR.rglob("*.py"):
        if prompt.search(path.read_text()):
            parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            with_prompts.add(".".join(parts))
    assert {"keras_moe.balance", "keras_moe.embedding",
            "keras_moe.sampled_softmax"} <= with_prompts
    assert sorted(m.__name__ for m in MODULES) == sorted(with_prompts)


def test_no_other_test_file_runs_doctests():
    """Each module's examples run once: here, not again elsewhere."""
    runners = sorted(
        path.name for path in TESTS_DIR.glob("*.py")
        if path.name != pathlib.Path(__file__).name
        and re.search(r"^(import|from) doctest\b", path.read_text(),
                      re.MULTILINE)
    )
    assert runners == []
