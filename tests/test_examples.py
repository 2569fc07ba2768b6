"""Runs the example scripts end to end (in quick mode) in a subprocess."""

import re
import struct

import pytest

from example_runner import check_ran, run_example

def test_quickstart_quick():
    result = run_example("quickstart.py", "--quick")
    output = check_ran(result, "quickstart.py --quick")
    assert "test MSE:" in result.stdout, output
    assert "load balance: CV^2(load) =" in result.stdout, output
    assert "export check passed" in result.stdout, output


def test_transformer_block_quick():
    result = run_example("transformer_block.py", "--quick")
    output = check_ran(result, "transformer_block.py --quick")
    assert "validation accuracy over real tokens:" in result.stdout, output
    for key in ("aux_loss", "importance_cv2", "load_cv2", "max_overload"):
        assert f"moe_ffn_{key}" in result.stdout, output
    assert "padding check passed" in result.stdout, output


def test_custom_training_loop_quick_mirrored():
    # The strategy path: the single-device default runs the same step
    # under the default strategy.
    result = run_example("custom_training_loop.py", "--quick",
                         "--replicas", "2")
    output = check_ran(result, "custom_training_loop.py --quick")
    assert "2 replica(s) (MirroredStrategy)" in result.stdout, output
    assert "test MSE:" in result.stdout, output
    match = re.search(r"balancing loss ([0-9.]+) \(layer metric "
                      r"moe_aux_loss ([0-9.]+)\)", result.stdout)
    assert match, output
    added, metric = (float(v) for v in match.groups())
    assert metric > 0, output
    # The loss the loop added from model.losses is the layer's balancing
    # loss of the global batch, counted once (not once per replica).
    assert abs(added - metric) <= 1e-5 + 1e-3 * metric, output


def test_serving_quick():
    result = run_example("serving.py", "--quick")
    output = check_ran(result, "serving.py --quick")
    assert "serving signature 'serving_default':" in result.stdout, output
    assert "input  ids: shape (None, None), dtype int32" in result.stdout, (
        output)
    assert "keras.layers.TFSMLayer" in result.stdout, output
    assert "serving check passed" in result.stdout, output


def test_inspect_routing_quick(tmp_path):
    result = run_example("inspect_routing.py", "--quick", "--out",
                         str(tmp_path))
    output = check_ran(result, "inspect_routing.py --quick")
    for expert in range(4):
        assert f"expert {expert}: " in result.stdout, output
    assert "load (tokens per expert):" in result.stdout, output
    # 512 sentences / batch 64 x 2 epochs = 16 recorded steps.
    assert "RoutingMonitor recorded 16 steps (1..16) of 4 experts" in (
        result.stdout), output
    png = (tmp_path / "load_heatmap.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    # The steps x experts cells (2 x 8 pixels each), with the axes' labels
    # and the colour bar around them (tests/test_heatmap.py: the layout).
    assert width > 16 * 2 and height > 4 * 8, (width, height)
    assert list((tmp_path / "logs").glob("events.out.tfevents.*"))


# tests/test_keras_hub.py checks the same (outputs, loss, fit, generate)
# on smaller models.
@pytest.mark.slow
def test_sparsify_keras_hub_quick():
    pytest.importorskip("keras_hub")
    result = run_example("sparsify_keras_hub.py", "--quick")
    output = check_ran(result, "sparsify_keras_hub.py --quick")
    assert ("keras-hub's model with these weights generates the same "
            "tokens") in result.stdout, output
    assert "all checks passed" in result.stdout, output
