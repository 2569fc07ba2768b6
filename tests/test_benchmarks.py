"""The benchmark (benchmarks/bench_moe.py) runs in --quick mode and reports
every field for every configuration. No timing is asserted: the numbers of
a --quick run on scaled-down shapes mean nothing."""

import json
import os
import subprocess
import sys

import pytest

from numerics import FORWARD, assert_close

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_ROOT, "benchmarks", "bench_moe.py")
CONFIGS = {
    "large": ("train_fwd", "train_fwd_bwd", "infer_fwd"),
    "small-batch": ("train_fwd", "train_fwd_bwd", "infer_fwd"),
    "many-experts": ("train_fwd", "train_fwd_bwd", "infer_fwd"),
    "serving": ("infer_fwd",),
}
METHODS = ("sparse", "capacity", "capacity_xla", "original", "dense_all",
           "oracle")
OURS = ("sparse", "capacity", "capacity_xla")
TIME_KEYS = ("median_s", "min_s", "n", "inner", "first_call_s")
RATE_KEYS = ("gemm_gflops", "gemm_gflops_best", "read_gbps", "read_gbps_best")


def _quick(script, out, timeout, *args):
    """Runs a benchmark script with --quick (and `args`); its JSON, stdout
    and stderr."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
               KERAS_BACKEND="tensorflow")
    proc = subprocess.run(
        [sys.executable, script, "--quick", "--json", str(out), *args],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out) as f:
        return json.load(f), proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    return _quick(SCRIPT, tmp_path_factory.mktemp("bench") / "quick.json",
                  timeout=420)


def _check_config(cfg, name, modes, original_found):
    """Every field of one configuration's results."""
    assert tuple(cfg["modes"]) == modes
    for key in RATE_KEYS:
        assert cfg["rates"][key] > 0, (name, key)
    for key in ("active_experts_train", "active_experts_infer",
                "capacity_train", "capacity_infer",
                "capacity_dropped_fraction_train",
                "capacity_dropped_fraction_infer"):
        assert cfg["routing"][key] is not None, (name, key)
    for mode in modes:
        assert cfg["useful_gflop"][mode] > 0
        assert cfg["weight_mb"][mode] > 0
        assert cfg["roofline_s"][mode] > 0
        assert cfg["roofline_bound"][mode] in ("compute", "memory")
    for method in METHODS:
        for mode in modes:
            t = cfg["times"][method][mode]
            for key in TIME_KEYS:
                assert key in t, (name, method, mode, key)
            measured = method != "original" or original_found
            if measured:
                assert t["median_s"] > 0, (name, method, mode, t)
            for table in ("R_oracle", "R_roofline", "vs_original"):
                value = cfg[table][method][mode]
                if measured and (table != "vs_original"
                                 or original_found):
                    assert value > 0, (name, table, method, mode)
    # The same weights and routing everywhere: the peer computes the
    # sparse layer's outputs, and so does the original. By the rule of
    # tests/numerics.py, from the difference and scale the benchmark
    # reports: max|dense_all - sparse| <= tol * max|sparse|; a sum of |y|
    # over tokens * d entries moves by at most tokens * d times that
    # (its floor).
    check = cfg["check"]
    assert check["max_abs_y_sparse"] > 0, (name, check)
    diff = check["max_abs_diff_dense_all_vs_sparse"]
    assert diff is not None, (name, check)
    assert_close(diff, 0.0, FORWARD, floor=check["max_abs_y_sparse"],
                 what=f"{name}: max|y_dense_all - y_sparse|")
    if original_found:
        entries = cfg["shape"]["tokens"] * cfg["shape"]["d"]
        assert_close(check["sum_abs_y_original"],
                     check["sum_abs_y_sparse"], FORWARD,
                     floor=entries * check["max_abs_y_sparse"],
                     what=f"{name}: sum|y| of the original")


def _check_memory(memory, original_found):
    """The peak-memory table's fields."""
    for method in ("sparse", "capacity", "capacity_xla", "oracle",
                   "original"):
        if method == "original" and not original_found:
            continue
        assert memory["methods"][method]["peak_delta_mb"] is not None, (
            method, memory["methods"][method])
        assert memory["ratio_vs_oracle"][method] is not None


def test_quick_run_of_one_configuration_and_the_memory_table(tmp_path):
    # What the full --quick run below checks for every configuration, on
    # one training configuration and the memory table: a third of its time.
    results, stdout, _ = _quick(SCRIPT, tmp_path / "subset.json", 300,
                                "--configs", "small-batch,memory")
    original_found = results["meta"]["original"] is not None
    assert set(results["configs"]) == {"small-batch"}
    assert "scaling" not in results
    _check_config(results["configs"]["small-batch"], "small-batch",
                  CONFIGS["small-batch"], original_found)
    _check_memory(results["memory"], original_found)
    for heading in ("## Measured rates", "## small-batch:", "## Peak memory",
                    "## Targets"):
        assert heading in stdout, heading


@pytest.mark.slow
def test_quick_run_reports_every_field(quick_run):
    results, stdout, stderr = quick_run
    original_found = results["meta"]["original"] is not None
    assert results["meta"]["quick"] is True
    assert isinstance(results["meta"]["environment"], dict)
    for when in ("start", "end"):
        for key in RATE_KEYS:
            assert results["rates"][when][key] > 0, (when, key)

    assert set(results["configs"]) == set(CONFIGS)
    for name, modes in CONFIGS.items():
        _check_config(results["configs"][name], name, modes, original_found)

    scaling = results["scaling"]
    assert len(scaling["experts"]) == 4
    hi, lo = scaling["cost_ratio_experts"]
    assert hi in scaling["experts"] and lo in scaling["experts"]
    for method in ("sparse", "capacity", "capacity_xla", "original",
                   "oracle"):
        for e in scaling["experts"]:
            t = scaling["times"][method][str(e)]
            if method != "original" or original_found:
                assert t["median_s"] > 0, (method, e)
        if method != "original" or original_found:
            assert scaling["cost_ratio"][method] > 0

    _check_memory(results["memory"], original_found)

    targets = results["targets"]
    assert len(targets) == 12
    for t in targets:
        assert set(t) == {"target", "value", "limit", "met", "note"}
        if original_found or "original" not in t["target"]:
            assert t["value"] is not None, t  # a value, met or not
            assert t["met"] in (True, False)

    # The readable table and a progress line per configuration.
    for heading in ("## Measured rates", "Environment: ", "## large:", "## small-batch:",
                    "## many-experts:", "## serving:", "## Scaling",
                    "## Peak memory", "## Targets"):
        assert heading in stdout, heading
    for name in CONFIGS:
        assert "] %s done in" % name in stderr, name


def test_expert_kernels_quick_run_reports_every_field(tmp_path):
    # benchmarks/bench_expert_kernels.py: TensorFlow's per-expert matmuls
    # against numpy's BLAS. Fields only; no timing is asserted.
    script = os.path.join(REPO_ROOT, "benchmarks",
                          "bench_expert_kernels.py")
    results, stdout, _ = _quick(script, tmp_path / "kernels.json",
                                timeout=300)
    assert results["meta"]["quick"] is True
    assert set(results["configs"]) == {"small-batch", "many-experts",
                                       "serving"}
    for name, entry in results["configs"].items():
        assert 0 < entry["active_experts"] <= entry["shape"]["experts"]
        assert set(entry["kernels"]) == {"forward", "kernel_grad"}
        for kernel, r in entry["kernels"].items():
            for key in ("tf_s", "blas_s", "tf_gbps", "blas_gbps"):
                assert r[key] > 0, (name, kernel, key)
            assert r["blas_over_tf"] == r["blas_s"] / r["tf_s"]
            assert "| %s | %s |" % (name, kernel) in stdout
