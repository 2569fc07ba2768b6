"""Runs the example scripts end to end (in quick mode) in a subprocess."""

import os
import pathlib
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_example(script, *args, timeout=300):
    env = dict(os.environ, KERAS_BACKEND="tensorflow")
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / script), *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_quickstart_quick():
    result = run_example("quickstart.py", "--quick")
    output = result.stdout + result.stderr
    assert result.returncode == 0, (
        f"quickstart.py --quick exited with {result.returncode}:\n{output}")
    assert "test MSE:" in result.stdout, output
    assert "load balance: CV^2(load) =" in result.stdout, output
    assert "export check passed" in result.stdout, output
