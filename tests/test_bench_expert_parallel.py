"""benchmarks/bench_expert_parallel.py --quick runs and reports what issue
15 asks for: 1/R of the expert bytes per device and R times the tokens per
expert when sharded (its numbers on a real size are in docs/)."""

import os
import re
import subprocess
import sys

import reference_harness

SCRIPT = os.path.join(reference_harness.REPO_ROOT, "benchmarks",
                      "bench_expert_parallel.py")


def test_quick_run_reports_bytes_tokens_and_step_time():
    # Its own process: it splits the CPU into logical devices first.
    result = subprocess.run(
        [sys.executable, SCRIPT, "--quick"], capture_output=True, text=True,
        timeout=300, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert re.search(r"^\| replicated \| [\d.]+ \| 2 \|", out, re.M), out
    assert re.search(r"^\| sharded \| [\d.]+ \| 2 \|", out, re.M), out
    ratios = re.search(
        r"expert bytes per device ([\d.]+) \(1/R = 0.50\), tokens per "
        r"expert ([\d.]+) \(R = 2\), step time ([\d.]+)", out)
    assert ratios, out
    assert float(ratios.group(1)) == 0.5
    # Each sharded expert runs on both replicas' tokens.
    assert 1.5 < float(ratios.group(2)) < 2.5
