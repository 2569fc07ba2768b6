"""The peers benchmark (benchmarks/bench_peers.py) runs in --quick mode and
reports every case, its ratios and the targets. No time is asserted: the
numbers of tiny shapes mean nothing.

Model Garden runs where `KERAS_MOE_MODEL_GARDEN_PYTHON` names the Python of
an environment that has it (benchmarks/README.md); elsewhere (CI) the test
hands the benchmark this Python, which has no Model Garden, and checks that
it is skipped with a note."""

import importlib.util
import json
import os
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_DIR = os.path.join(REPO_ROOT, "benchmarks")

# The benchmark scripts import each other by name from benchmarks/ (as when
# they run as scripts): it is on sys.path while the script is imported.
sys.path.insert(0, BENCH_DIR)
try:
    import bench_peers
    import model_garden_runner
finally:
    sys.path.remove(BENCH_DIR)

MODEL_GARDEN_PYTHON = os.environ.get("KERAS_MOE_MODEL_GARDEN_PYTHON")
# One case of each peer (each is a few traces, seconds): the family with
# more experts and k, the training step (forward, backward and update).
FAMILY = "qwen3-like"
MODE = "train_step"
OURS = ("ours_sparse", "ours_capacity", "ours_expert_choice")


def _quick_run(out):
    """The JSON and markdown of a --quick run of both peers, one case each.
    In this process (TensorFlow is imported already, which saves seconds);
    Model Garden in its worker process, as always."""
    python = MODEL_GARDEN_PYTHON or sys.executable
    assert bench_peers.main([
        "--quick", "--families", FAMILY, "--modes", MODE,
        "--json", str(out / "quick.json"),
        "--markdown", str(out / "quick.md"),
        "--model-garden-python", python]) == 0
    with open(out / "quick.json") as f:
        results = json.load(f)
    with open(out / "quick.md") as f:
        return results, f.read()


@pytest.mark.parametrize("batches, families", [
    (bench_peers.BATCHES, bench_peers.FAMILIES),
    (bench_peers.QUICK_BATCHES, bench_peers.QUICK_FAMILIES),
])
def test_model_garden_runs_k_slots_per_token(batches, families):
    # Its experts-choose router with capacity_factor = k does exactly the
    # expert work of top-k routing at every shape the benchmark runs.
    for family in families.values():
        for mode in bench_peers.MODES:
            shape = bench_peers.case_shape(family, mode, batches)
            assert model_garden_runner.expert_slots(
                shape, shape["k"]) == shape["k"] * shape["tokens"], shape


def test_quick_run_reports_every_case(tmp_path):
    # One test for both peers' checks: one run (under pytest-xdist a shared
    # fixture would run once per worker).
    results, stdout = _quick_run(tmp_path)
    _check_model_garden(results, stdout)
    _check_keras_hub(results, stdout)


def _check_model_garden(results, stdout):
    cases = [(c["family"], c["mode"]) for c in results["model_garden"]]
    assert cases == [(FAMILY, MODE)]
    garden = results["meta"]["model_garden"]
    ran = "versions" in garden
    if MODEL_GARDEN_PYTHON:
        assert ran, garden
    else:
        assert garden["error"].startswith(
            "Model Garden not importable with %s: no module named "
            "'official'" % sys.executable), garden
        assert "**Model Garden skipped: %s.**" % garden["error"] in stdout
    for case in results["model_garden"]:
        assert case["useful_gflop"] > 0, case
        for method in OURS:
            assert case["times"][method]["median_s"] > 0, (case, method)
            assert case["useful_gflops_per_s"][method] > 0, (case, method)
        garden_time = case["times"]["model_garden"]
        if ran:
            assert garden_time["median_s"] > 0, case
            assert case["model_garden_expert_slots"] == (
                case["shape"]["k"] * case["shape"]["tokens"]), case
            for method in OURS:
                assert case["vs_model_garden"][method] > 0, (case, method)
        else:
            assert garden_time["median_s"] is None, case
            assert garden_time["error"].startswith("skipped: "), case
            assert case["vs_model_garden"]["ours_sparse"] is None, case
        row = "| %s (d %d, h %d, E %d, k %d) | %s | %d |" % (
            case["family"], case["shape"]["d"], case["shape"]["hidden"],
            case["shape"]["experts"], case["shape"]["k"], case["mode"],
            case["shape"]["tokens"])
        assert row in stdout, row
    targets = [t for t in results["targets"]
               if t["target"].startswith("ours / Model Garden")]
    assert len(targets) == len(cases)
    for target in targets:
        if ran:
            assert target["value"] > 0 and target["met"] in (True, False)
        else:
            assert target["value"] is None and target["met"] is None
    for line in ("Machine: ", "Environment: ", "Load average "):
        assert line in stdout, line


def _check_keras_hub(results, stdout):
    cases = results["keras_hub"]
    assert [(c["family"], c["mode"]) for c in cases] == [(FAMILY, MODE)]
    hub = results["meta"]["keras_hub"]
    ran = not hub.get("error") and not hub.get("failed")
    if importlib.util.find_spec("keras_hub") is None:
        assert hub["error"].startswith("keras-hub not importable: "), hub
        assert "**keras-hub skipped: %s.**" % hub["error"] in stdout
    elif importlib.util.find_spec("keras_moe.integrations") is not None:
        assert ran, hub
        assert hub["backbones"] == ["Qwen3MoeBackbone"]
    targets = {t["target"]: t for t in results["targets"]}
    for case in cases:
        s = case["shape"]
        assert case["ideal_ratio"] == s["k"] / s["experts"]
        target = targets["keras-hub sparsified / dense block, %s, %s" % (
            FAMILY, case["mode"])]
        assert target["limit"] == 0.2
        if ran:
            # The sparsified block computes the dense block's function.
            assert case["max_rel_diff"] < 1e-4, case
            for method in ("dense_block", "sparsified"):
                assert case["times"][method]["median_s"] > 0, (case, method)
            assert case["sparsified_vs_dense"] > 0, case
            assert target["value"] == case["sparsified_vs_dense"]
            assert target["met"] in (True, False)
        else:
            assert case["sparsified_vs_dense"] is None, case
            assert target["met"] is None, target
            for method in ("dense_block", "sparsified"):
                assert case["times"][method]["error"].startswith(
                    "skipped: "), case
        assert ("| %s (d %d, h %d, E %d, k %d) | %s | %d |" % (
            FAMILY, s["d"], s["hidden"], s["experts"], s["k"], case["mode"],
            s["tokens"])) in stdout


@pytest.mark.parametrize("option, value", [
    ("--families", "mixtral-like,llama"), ("--modes", "train"),
    ("--peers", "")])
def test_unknown_subsets_are_refused(option, value, capsys):
    with pytest.raises(SystemExit):
        bench_peers.parse_args([option, value])
    assert "Received: %s=%s" % (option, value) in capsys.readouterr().err
