"""The tracing benchmark (benchmarks/bench_tracing.py) runs in --quick mode
and reports every configuration, its numbers and the targets' lines. No
time is asserted: the benchmark measures, the issue's limits are printed."""

import json
import os
import subprocess
import sys

import pytest

from keras_moe import grouped_feed_forward

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_ROOT, "benchmarks", "bench_tracing.py")
# What the test runs of --quick (each configuration is a fresh process, so
# the capacity dispatch's sizes are left to tests/test_moe.py's graph-size
# test): the sparse dispatch at two sizes past
# grouped_feed_forward.MAX_UNROLLED_GROUPS, and a small hierarchical layer.
QUICK_FLAT = (40, 200)
DISPATCHES = ("sparse",)
QUICK_CONFIGS = ["%s-%d" % (d, e) for d in DISPATCHES for e in QUICK_FLAT]
QUICK_CONFIGS.append("hierarchical-2x2")
POSITIVE = ("build_s", "first_fit_s", "later_epoch_s", "graph_nodes",
            "functions", "max_rss_mib", "wall_s")


def _run(args, timeout):
    """The script's exit status, stdout and stderr."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
               KERAS_BACKEND="tensorflow")
    proc = subprocess.run([sys.executable, SCRIPT, *args],
                          cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_tracing") / "quick.json"
    returncode, stdout, stderr = _run(
        ["--quick", "--configs", ",".join(QUICK_CONFIGS), "--json", str(out)],
        400)
    assert returncode == 0, stderr[-4000:]
    with open(out) as f:
        return json.load(f), stdout


def test_quick_sizes_are_looped_alike():
    # Both quick sizes past MAX_UNROLLED_GROUPS, with the same loops (full
    # steps and a remainder), so that their graphs must be the same.
    step = grouped_feed_forward.GROUPS_PER_STEP
    for experts in QUICK_FLAT:
        assert experts > grouped_feed_forward.MAX_UNROLLED_GROUPS
        assert experts >= step and experts % step, experts


@pytest.mark.slow
def test_quick_run_reports_every_configuration(quick_run):
    results, stdout = quick_run
    assert list(results["configs"]) == QUICK_CONFIGS
    for name, res in results["configs"].items():
        assert res["status"] == "ok", (name, res)
        for key in POSITIVE:
            assert res[key] > 0, (name, key, res[key])
        assert ("| %s |" % name) in stdout, name
    meta = results["meta"]
    assert meta["quick"] is True
    assert len(meta["load_before"]) == len(meta["load_after"]) == 3
    assert "oneDNN: o" in meta["settings"]["cpu"]
    for line in ("Machine: ", "Environment: ", "Load average "):
        assert line in stdout, line
    assert "TensorFlow %s, Keras %s" % (
        meta["settings"]["tensorflow"], meta["settings"]["keras"]) in stdout


@pytest.mark.slow
def test_looped_flat_graph_does_not_grow_with_experts(quick_run):
    results, _ = quick_run
    for dispatch in DISPATCHES:
        nodes = {e: results["configs"]["%s-%d" % (dispatch, e)]["graph_nodes"]
                 for e in QUICK_FLAT}
        assert len(set(nodes.values())) == 1, (dispatch, nodes)


@pytest.mark.slow
def test_quick_run_prints_the_targets(quick_run):
    results, stdout = quick_run
    target_lines = [l for l in stdout.splitlines()
                    if l.startswith("- target: ")]
    assert len(target_lines) == len(results["targets"]) == 3
    sparse, capacity, hierarchical = zip(target_lines, results["targets"])
    for line, target in (sparse, hierarchical):
        assert target["value"] > 0, target
        assert line.endswith(": met") or line.endswith(": not met"), line
    assert "sparse: %d experts / %d experts" % (
        QUICK_FLAT[1], QUICK_FLAT[0]) in sparse[0], sparse[0]
    # Not run here: said so, not a number.
    assert capacity[1]["value"] is None, capacity
    assert capacity[0].endswith(": not measured"), capacity[0]
    assert "hierarchical" in hierarchical[0]


def test_a_configuration_past_the_timeout_is_reported(tmp_path):
    out = tmp_path / "timeout.json"
    returncode, stdout, stderr = _run(
        ["--configs", "hierarchical-2x2", "--timeout", "1", "--quick",
         "--json", str(out)], 120)
    assert returncode == 0, stderr[-4000:]
    with open(out) as f:
        results = json.load(f)
    assert results["configs"]["hierarchical-2x2"]["status"] == "timed out"
    row = "| hierarchical-2x2 | hierarchical | sparse | 4 | — | timed out |"
    assert row in stdout, stdout
    assert stdout.rstrip().endswith(": not measured")
