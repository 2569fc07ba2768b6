"""Runs examples/language_model.py --quick end to end in a subprocess."""

import importlib.util
import json
import math
import re

from example_runner import check_ran, run_example

HEADER = "| model | experts (k) | params total |"


def _row_cells(line):
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_language_model_quick(tmp_path):
    out = tmp_path / "lm"
    # --quick takes under two minutes on 2 idle CPU cores; leave room for
    # a loaded test machine.
    result = run_example("language_model.py", "--quick", "--out", str(out),
                         timeout=600)
    output = check_ran(result, "language_model.py --quick")

    lines = result.stdout.splitlines()
    header = [i for i, line in enumerate(lines) if line.startswith(HEADER)]
    assert len(header) == 1, output
    columns = _row_cells(lines[header[0]])
    rows = {}
    for line in lines[header[0] + 2:]:
        if not line.startswith("|"):
            break
        cells = _row_cells(line)
        assert len(cells) == len(columns), line
        rows[cells[0]] = dict(zip(columns, cells))
    assert set(rows) == {"dense", "moe-4"}, output

    for name, row in rows.items():
        final = float(row["final val ppl"])
        best = float(re.match(r"([\d.]+) \(\d+\)", row["best val ppl (step)"])
                     .group(1))
        assert math.isfinite(final) and 1.0 < final < 1e4, (name, row)
        assert math.isfinite(best) and 1.0 < best <= final, (name, row)
        assert float(row["ms / step"]) > 0, (name, row)
    # Equal compute per token: the MoE's experts do the dense FFN's
    # multiply-adds, plus its small gate.
    dense_macs = int(rows["dense"]["FFN mult-adds / token"].replace(",", ""))
    moe_macs = int(rows["moe-4"]["FFN mult-adds / token"].replace(",", ""))
    assert dense_macs <= moe_macs < 1.2 * dense_macs, rows
    # The routing metrics from the fit logs are in the MoE row.
    train_cv2, val_cv2 = rows["moe-4"]["load CV² train / val"].split(" / ")
    assert math.isfinite(float(train_cv2)) and math.isfinite(float(val_cv2))

    assert (out / "results.md").read_text().startswith(HEADER)
    history = json.loads((out / "history.json").read_text())
    assert [r["name"] for r in history["results"]] == ["dense", "moe-4"]
    for r in history["results"]:
        assert len(r["val_ppl"]) == len(r["steps"]) >= 2
    if importlib.util.find_spec("matplotlib") is not None:
        png = out / "language_model.png"
        assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "skipping the figure" in result.stdout, output
