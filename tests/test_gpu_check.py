"""The GPU check (benchmarks/gpu_check.py) runs with --tiny on this machine
and prints every row: the GPU-only ones skipped with a reason where no GPU
is visible, the others with numbers. No time is asserted."""

import json
import os
import re
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_DIR = os.path.join(REPO_ROOT, "benchmarks")
SCRIPT = os.path.join(BENCH_DIR, "gpu_check.py")

# The benchmark scripts import each other by name from benchmarks/ (as when
# they run as scripts): it is on sys.path while the script is imported.
sys.path.insert(0, BENCH_DIR)
try:
    import gpu_check
finally:
    sys.path.remove(BENCH_DIR)


def _table(stdout):
    """The markdown table's rows as {row name: [cells]}, in order."""
    rows = {}
    for line in stdout.splitlines():
        if not line.startswith("| ") or line.startswith("| row |"):
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        rows[cells[0]] = cells
    return rows


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "tiny.json"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
               KERAS_BACKEND="tensorflow")
    proc = subprocess.run([sys.executable, SCRIPT, "--tiny", "--json",
                           str(out)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out) as f:
        return json.load(f), proc.stdout


def test_tiny_run_prints_every_row(tiny_run):
    results, stdout = tiny_run
    table = _table(stdout)
    assert list(table) == list(gpu_check.ROWS)
    assert [r["row"] for r in results["rows"]] == list(gpu_check.ROWS)
    for line in ("TensorFlow ", "CPU: ", "Devices: ", "Size: tokens 64"):
        assert line in stdout
    gpus = results["meta"]["gpus"]
    for r in results["rows"]:
        cells = table[r["row"]]
        assert len(cells) == 10, cells
        name, dispatch, policy, xla = cells[:4]
        assert (dispatch, policy, xla == "yes") == gpu_check.ROWS[name][:3]
        if r["status"] == "skipped":
            assert cells[-1] == "skipped: " + r["reason"]
            assert cells[4:9] == [""] * 5
            continue
        assert cells[-1] == "ok", cells
        first, step, tokens_per_s = (float(c) for c in cells[5:8])
        assert first > 0 and step > 0 and tokens_per_s > 0
        assert step == pytest.approx(1e3 * r["median_step_s"], rel=0.01)
        assert len(r["step_times_s"]) == 3
        if gpus:
            assert float(cells[8]) > 0
        else:
            assert cells[8] == "n/a"
    if not gpus:
        # Only the mirrored row needs GPUs (or --cpu-replicas).
        statuses = {r["row"]: r["status"] for r in results["rows"]}
        assert statuses == dict.fromkeys(gpu_check.ROWS, "ok") | {
            "mirrored": "skipped"}
        assert "needs 2 or more GPUs (0 visible)" in table["mirrored"][-1]
        assert "n/a: no GPU visible" in stdout


def test_skip_reasons():
    reason = gpu_check.skip_reason
    volta = [("GPU:0", "V100", (7, 0))]
    hopper = [("GPU:0", "H100", (9, 0)), ("GPU:1", "H100", (9, 0))]
    assert "1 visible" in reason("mirrored", volta, 0)
    assert reason("mirrored", hopper, 0) is None
    assert reason("mirrored", [], 2) is None
    assert "0 visible" in reason("mirrored", [], 1)
    assert "GPU:0 has 7.0" in reason("capacity_xla_bf16", volta, 0)
    assert reason("capacity_xla_bf16", hopper, 0) is None
    assert reason("capacity_xla_bf16", [], 0) is None
    assert reason("capacity_xla_fp16", volta, 0) is None
    assert gpu_check.row_devices("mirrored", hopper, 0) == ["GPU:0", "GPU:1"]
    assert gpu_check.row_devices("sparse", hopper, 0) == ["GPU:0"]
    assert gpu_check.row_devices("mirrored", [], 2) == ["CPU:0", "CPU:1"]


def test_mirrored_row_runs_over_logical_cpus():
    # The test process has logical CPUs (conftest.py): the mirrored row's
    # MirroredStrategy path, which the tiny run skips without GPUs.
    size = dict(gpu_check.SIZES["tiny"], warmup=0, steps=2)
    res = gpu_check.run_row("mirrored", size, ["CPU:0", "CPU:1"], [])
    assert res["median_step_s"] > 0 and len(res["step_times_s"]) == 2
    assert res["tokens_per_s"] == pytest.approx(
        2 * size["tokens"] / res["median_step_s"])
    assert res["peak_gpu_bytes"] is None


def test_a_failed_row_is_reported_and_the_others_run(monkeypatch, capsys,
                                                     tmp_path):
    def fake_run_row(name, size, devices, gpu_names):
        if name == "capacity":
            raise RuntimeError("out of memory | at step 1\nmore detail")
        return {"first_step_s": 1.0, "median_step_s": 0.01,
                "min_step_s": 0.01, "step_times_s": [0.01],
                "tokens_per_s": 100.0, "peak_gpu_bytes": None,
                "gpu_bytes_at_start": None}

    monkeypatch.setattr(gpu_check, "run_row", fake_run_row)
    out = tmp_path / "r.json"
    status = gpu_check.main(["--rows", "capacity,sparse", "--json", str(out)])
    assert status == 1
    table = _table(capsys.readouterr().out)
    assert list(table) == ["capacity", "sparse"]
    assert table["capacity"][-1] == (
        "failed: RuntimeError: out of memory \\| at step 1")
    assert table["sparse"][-1] == "ok"
    with open(out) as f:
        rows = json.load(f)["rows"]
    assert [r["status"] for r in rows] == ["failed", "ok"]
