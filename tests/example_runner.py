"""Runs an example script as a user would, and checks that it ran cleanly."""

import os
import pathlib
import re
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_example(script, *args, timeout=300):
    # Without the tests' TF_CPP_MIN_LOG_LEVEL: the log level is the
    # example's own, as a user who runs it sees it.
    env = dict(os.environ, KERAS_BACKEND="tensorflow")
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / script), *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def check_ran(result, script):
    output = result.stdout + result.stderr
    assert result.returncode == 0, (
        f"{script} exited with {result.returncode}:\n{output}")
    # No TensorFlow error lines (e.g. "failed call to cuInit" on a machine
    # without a GPU driver): the example sets the log level before
    # TensorFlow loads.
    errors = re.findall(r"^E\d{4} .*$|^.*cuInit.*$", output, re.MULTILINE)
    assert not errors, f"{script} printed TensorFlow errors: {errors}"
    return output
