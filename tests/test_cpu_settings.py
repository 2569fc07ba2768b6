"""The oneDNN probe (reference_harness.cpu_settings) that .ci/run,
pytest's header and benchmarks/bench_tracing.py rely on."""

import os
import subprocess
import sys

import pytest

from reference_harness import REPO_ROOT, cpu_settings


def _run(*args, onednn=None):
    env = dict(os.environ)
    env.pop("TF_ENABLE_ONEDNN_OPTS", None)
    if onednn is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = onednn
    result = subprocess.run(
        [sys.executable, "-m", "reference_harness.cpu_settings", *args],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_the_private_probe_still_exists():
    # Fails loudly if a TensorFlow upgrade moves the private module.
    assert isinstance(cpu_settings.onednn_enabled(), bool)


@pytest.mark.parametrize("onednn, state", [("0", "off"), ("1", "on")])
def test_the_probe_follows_the_setting(onednn, state):
    assert _run(onednn=onednn).endswith(
        "oneDNN: %s (TF_ENABLE_ONEDNN_OPTS=%s)" % (state, onednn))


@pytest.mark.skipif("TF_ENABLE_ONEDNN_OPTS" in os.environ,
                    reason="this process does not run TensorFlow's default")
def test_other_onednn_is_the_opposite_of_the_default():
    # This process runs TensorFlow's default; the script, without the
    # setting, names the other one.
    other = _run("--other-onednn")
    assert other == ("0" if cpu_settings.onednn_enabled() else "1")
