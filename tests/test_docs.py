"""The Python examples of the README and the docs run: each ```python
block is a complete program. A block preceded by the line `NOT_RUN` (an
HTML comment, invisible on the page) is a signature or needs what a test
cannot have (a TF1 checkpoint, a cluster)."""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOT_RUN = "<!-- not run by tests/test_docs.py -->"
# distributed.md's examples split the CPU into logical devices before
# TensorFlow starts; tests/test_distribute.py runs the same programs.
PAGES = ["README.md", "docs/guide.md", "docs/api.md", "docs/embedding.md",
         "docs/migration.md", "docs/keras_hub.md", "docs/routers.md"]

# Runs each block in a fresh namespace, in page order; resets Keras's
# global state between blocks, as separate programs would have it.
RUNNER = """
import json, sys, traceback
import keras
blocks = json.loads(sys.stdin.read())
for line, code in blocks:
    try:
        exec(compile(code, f"{sys.argv[1]}:{line}", "exec"), {})
    except Exception:
        traceback.print_exc()
        sys.exit(f"the example at {sys.argv[1]}:{line} failed")
    keras.config.set_dtype_policy("float32")
    keras.backend.clear_session()
"""


def python_blocks(text):
    """`[(line, code)]`: the ```python blocks to run, 1-based first code
    line."""
    lines = text.splitlines()
    blocks, start = [], None
    for number, line in enumerate(lines):
        if start is None and line.strip() == "```python":
            skipped = number > 0 and lines[number - 1].strip() == NOT_RUN
            start = -1 if skipped else number + 1  # -1: a block not to run
        elif start is not None and line.strip() == "```":
            if start >= 0:
                blocks.append((start + 1, "\n".join(lines[start:number])))
            start = None
    return blocks


def test_python_blocks_finds_and_skips():
    text = "\n".join([
        "```python", "a = 1", "```", NOT_RUN, "```python", "f(x)", "```",
        "```bash", "ls", "```", "```python", "b = 2", "c = 3", "```",
    ])
    assert python_blocks(text) == [(2, "a = 1"), (12, "b = 2\nc = 3")]


@pytest.mark.parametrize("page", PAGES)
def test_examples_run(page, tmp_path):
    blocks = python_blocks((ROOT / page).read_text())
    assert blocks, f"{page} has no examples"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(
        [sys.executable, "-c", RUNNER, page], input=json.dumps(blocks),
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
