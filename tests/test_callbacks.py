"""keras_moe.callbacks.RoutingMonitor: TensorBoard histograms of per-expert
load and importance at increasing steps, read back from the event files and
checked against the layer's own routing of each batch (and a sigmoid
router's bias after it); the PNG heat map,
decoded by `tf.io.decode_png` and checked pixel by pixel; and its errors.
The heat map's labels are checked in test_heatmap.py."""

import glob
import os
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.util import event_pb2

import keras_moe
from strategies import mirrored
from keras_moe import callbacks
from keras_moe.callbacks import RoutingMonitor, save_load_heatmap
from numerics import FORWARD, assert_close
from test_heatmap import _find, _find_text

NUM_EXPERTS = 5
BATCH = 16
NUM_BATCHES = 3
EPOCHS = 2
COOL, FAIR, WARM = (59, 76, 192), (221, 221, 221), (180, 4, 38)


def _data(num_features=6):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH * NUM_BATCHES, num_features)).astype("float32")
    return x, rng.normal(size=(len(x), 1)).astype("float32")


def _model(layer):
    inputs = keras.Input((6,))
    head = keras.layers.Dense(1, name="head")
    model = keras.Model(inputs, head(layer(inputs)))
    # A zero learning rate keeps the weights, so the layer's routing of
    # batch b after fit is the routing the callback saw at that batch.
    model.compile(keras.optimizers.SGD(0.0), "mse")
    return model


def _flat_layer(**kwargs):
    return keras_moe.MixtureOfExperts(
        NUM_EXPERTS, k=2, name="moe", noisy_gating=False,
        gate_initializer=keras.initializers.RandomNormal(seed=2), **kwargs)


def _expected_per_batch(layer, x):
    """The layer's `(load, importance)` of each training batch, flattened."""
    result = []
    for b in range(NUM_BATCHES):
        _, routing = layer(x[b * BATCH:(b + 1) * BATCH], training=True,
                           return_routing=True)
        result.append((routing["load"].numpy().reshape(-1),
                       routing["importance"].numpy().reshape(-1)))
    return result * EPOCHS


def _assert_recorded(key, recorded, expected, what):
    """What the monitor recorded of a batch is the layer's routing of it:
    the load (a count of tokens, without noise) exactly, the importance
    (a sum of gates, computed in `fit` and again eagerly) to FORWARD."""
    if key == "load":
        np.testing.assert_array_equal(recorded, expected, err_msg=what)
    else:
        assert_close(recorded, expected, FORWARD, what=what)


def _read_events(log_dir):
    """`{tag: [(step, summary value), ...]}` from all event files."""
    events = {}
    files = sorted(glob.glob(os.path.join(log_dir, "events.out.tfevents.*")))
    assert files, f"no event files in {log_dir}"
    for path in files:
        for record in tf.data.TFRecordDataset(path):
            event = event_pb2.Event.FromString(record.numpy())
            for value in event.summary.value:
                events.setdefault(value.tag, []).append((event.step, value))
    return events


def _decode_png(data):
    """`(channels, pixels)` of a PNG file, decoded by TensorFlow; pixels
    `[h, w]` for greyscale, `[h, w, 3]` for RGB."""
    pixels = tf.io.decode_png(data).numpy()
    channels = pixels.shape[-1]
    return channels, pixels[..., 0] if channels == 1 else pixels


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    keras.utils.set_random_seed(1234)
    out = tmp_path_factory.mktemp("routing")
    layer = _flat_layer()
    model = _model(layer)
    x, y = _data()
    monitor = RoutingMonitor(log_dir=str(out / "logs"),
                             heatmap_path=out / "figures" / "load.png",
                             per_expert_scalars=True)
    model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False,
              verbose=0, callbacks=[monitor])
    return {"out": out, "layer": layer, "model": model, "monitor": monitor,
            "expected": _expected_per_batch(layer, x)}


def test_histograms_match_each_batchs_load_at_increasing_steps(trained):
    events = _read_events(str(trained["out"] / "logs"))
    expected = trained["expected"]
    steps = list(range(1, NUM_BATCHES * EPOCHS + 1))   # optimizer iterations
    for key, which in (("load", 0), ("importance", 1)):
        records = events[f"moe/{key}"]
        assert [step for step, _ in records] == steps
        for (step, value), batch in zip(records, expected):
            values = batch[which]
            histo = value.histo
            assert value.WhichOneof("value") == "histo"
            assert histo.num == NUM_EXPERTS
            what = f"{key} histogram at step {step}"
            _assert_recorded(key, histo.sum, values.sum(), what + ": sum")
            _assert_recorded(key, histo.sum_squares, np.sum(values ** 2),
                             what + ": sum_squares")
            _assert_recorded(key, histo.min, values.min(), what + ": min")
            _assert_recorded(key, histo.max, values.max(), what + ": max")
            assert sum(histo.bucket) == NUM_EXPERTS
        # The per-expert scalars hold the values themselves.
        for i in range(NUM_EXPERTS):
            records = events[f"moe/{key}/expert_{i}"]
            assert [step for step, _ in records] == steps
            _assert_recorded(
                key, [value.simple_value for _, value in records],
                [batch[which][i] for batch in expected],
                f"{key} of expert {i}")
    # The batches differ, so the steps really hold different loads.
    loads = np.array([batch[0] for batch in expected])
    assert np.ptp(loads[:NUM_BATCHES], axis=0).max() > 0
    # The load is the count of tokens per expert (no noise): k per token.
    np.testing.assert_array_equal(loads.sum(axis=1), 2 * BATCH)


def test_history_holds_steps_load_and_importance(trained):
    history = trained["monitor"].history
    assert list(history) == ["moe"]
    np.testing.assert_array_equal(history["moe"]["step"],
                                  np.arange(1, NUM_BATCHES * EPOCHS + 1))
    _assert_recorded("load", history["moe"]["load"],
                     [batch[0] for batch in trained["expected"]], "load")
    _assert_recorded("importance", history["moe"]["importance"],
                     [batch[1] for batch in trained["expected"]],
                     "importance")
    assert trained["monitor"].monitored_layers == [trained["layer"]]


def test_heatmap_written_at_train_end_is_a_valid_png(trained):
    path = trained["out"] / "figures" / "load.png"
    assert path.exists()
    channels, pixels = _decode_png(path.read_bytes())
    assert channels == 3
    # The labelled map of the recorded load relative to each step's mean,
    # its steps the optimizer iterations, its title the layer name.
    history = trained["monitor"].history["moe"]
    expected = save_load_heatmap(trained["out"] / "again.png",
                                 history["load"], cell_size=(8, 2),
                                 steps=history["step"], titles="moe")
    np.testing.assert_array_equal(pixels, expected)
    steps = NUM_BATCHES * EPOCHS
    bare = save_load_heatmap(trained["out"] / "bare.png", history["load"],
                             labels=False)
    assert bare.shape == (NUM_EXPERTS * 8, steps * 2, 3)
    [(top, left)] = _find(pixels, bare)
    [(y, x)] = _find_text(pixels, "moe")
    assert y < top
    assert any(y > top + bare.shape[0] for y, _ in _find_text(pixels, "1"))
    # save_heatmap draws the same on demand.
    image = trained["monitor"].save_heatmap(trained["out"] / "demand.png")
    np.testing.assert_array_equal(image, expected)
    image = trained["monitor"].save_heatmap(trained["out"] / "bare2.png",
                                            labels=False)
    np.testing.assert_array_equal(image, bare)


def test_hierarchical_layer_every_other_batch(tmp_path):
    layer = keras_moe.HierarchicalMixtureOfExperts(
        3, 2, k=1, group_k=1, name="hmoe", noisy_gating=False,
        gate_initializer=keras.initializers.RandomNormal(seed=2))
    model = _model(layer)
    x, y = _data()
    monitor = RoutingMonitor(log_dir=tmp_path, update_freq=2)
    model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False,
              verbose=0, callbacks=[monitor])
    expected = _expected_per_batch(layer, x)[1::2]
    events = _read_events(str(tmp_path))
    assert [step for step, _ in events["hmoe/load"]] == [2, 4, 6]
    assert "hmoe/load/expert_0" not in events   # per_expert_scalars off
    history = monitor.history["hmoe"]
    np.testing.assert_array_equal(history["step"], [2, 4, 6])
    assert history["load"].shape == (3, 6)   # [records, groups * experts]
    _assert_recorded("load", history["load"],
                     [batch[0] for batch in expected], "hmoe load")
    for (step, value), batch in zip(events["hmoe/load"], expected):
        assert value.histo.num == 6
        _assert_recorded("load", value.histo.sum, batch[0].sum(),
                         f"hmoe load histogram at step {step}: sum")


def test_load_is_global_under_mirrored_strategy(tmp_path):
    x, y = _data()
    reference_layer = _flat_layer()
    reference = _model(reference_layer)
    expected = _expected_per_batch(reference_layer, x)[:NUM_BATCHES]
    strategy = mirrored(2)
    with strategy.scope():
        model = _model(_flat_layer())
    model.set_weights(reference.get_weights())
    monitor = RoutingMonitor(log_dir=tmp_path)
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
              callbacks=[monitor])
    history = monitor.history["moe"]
    np.testing.assert_array_equal(history["step"], [1, 2, 3])
    # The global batch's load (both replicas' tokens), not one replica's.
    _assert_recorded("load", history["load"],
                     [batch[0] for batch in expected], "global load")
    np.testing.assert_array_equal(history["load"].sum(axis=1), 2 * BATCH)
    events = _read_events(str(tmp_path))
    assert [step for step, _ in events["moe/load"]] == [1, 2, 3]


def test_heatmap_encodes_a_hand_built_load_matrix(tmp_path):
    # [steps, experts]; the mean load of every step is 2.
    load = np.array([[2.0, 2.0, 2.0, 2.0],     # balanced
                     [8.0, 0.0, 0.0, 0.0],     # all on expert 0
                     [1.0, 3.0, 4.0, 0.0],
                     [0.0, 0.0, 0.0, 0.0]])    # nothing routed
    path = tmp_path / "gray.png"
    image = save_load_heatmap(path, load, colormap="gray", cell_size=(1, 1),
                              labels=False)
    channels, pixels = _decode_png(path.read_bytes())
    assert (channels, pixels.shape) == (1, (4, 4))
    expected = [[128, 255, 64, 0],     # expert 0 over the 4 steps
                [128, 0, 191, 0],
                [128, 0, 255, 0],
                [128, 0, 0, 0]]
    np.testing.assert_array_equal(pixels, expected)
    np.testing.assert_array_equal(image, expected)

    # vmax moves the top of the scale: vmax=4, load/mean = 4 -> 255.
    image = save_load_heatmap(tmp_path / "vmax.png", load, vmax=4.0,
                              colormap="gray", cell_size=(1, 1),
                              labels=False)
    np.testing.assert_array_equal(image[:, 1], [255, 0, 0, 0])
    np.testing.assert_array_equal(image[:, 0], [64, 64, 64, 64])

    # coolwarm, 3 x 2 pixel cells.
    path = tmp_path / "color.png"
    save_load_heatmap(path, load, cell_size=(3, 2), labels=False)
    channels, pixels = _decode_png(path.read_bytes())
    assert (channels, pixels.shape) == (3, (4 * 3, 4 * 2, 3))
    cells = pixels[::3, ::2]
    np.testing.assert_array_equal(np.repeat(np.repeat(cells, 3, 0), 2, 1),
                                  pixels)
    assert all(tuple(cells[i, 0]) == FAIR for i in range(4))
    assert tuple(cells[0, 1]) == WARM and tuple(cells[1, 1]) == COOL
    assert tuple(cells[0, 3]) == COOL
    # 1/2 of a fair share: halfway between the cool and the fair colours.
    np.testing.assert_array_equal(
        cells[0, 2], np.round((np.array(COOL) + FAIR) / 2))


def test_heatmap_stacks_layers_and_averages_steps(tmp_path):
    a = np.array([[1.0, 1.0], [2.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    b = np.array([[3.0, 0.0, 0.0]] * 4)
    image = save_load_heatmap(tmp_path / "two.png", [a, b], colormap="gray",
                              cell_size=(1, 1), labels=False)
    assert image.shape == (2 + callbacks.SEPARATOR_HEIGHT + 3, 4)
    np.testing.assert_array_equal(image[:2], [[128, 255, 0, 128],
                                              [128, 0, 255, 128]])
    np.testing.assert_array_equal(image[2:4], 0)   # the separator
    np.testing.assert_array_equal(image[4:], [[255] * 4, [0] * 4, [0] * 4])
    # 4 steps drawn as 2 columns: relative loads averaged over pairs.
    image = save_load_heatmap(tmp_path / "avg.png", a, colormap="gray",
                              cell_size=(1, 1), max_steps=2, labels=False)
    np.testing.assert_array_equal(image, [[191, 64], [64, 191]])


def test_encode_png_is_a_deprecated_alias_of_tf_io_encode_png():
    pixels = np.arange(24, dtype=np.uint8).reshape(2, 4, 3)
    with pytest.warns(DeprecationWarning, match="tf.io.encode_png"):
        data = callbacks.encode_png(pixels)
    np.testing.assert_array_equal(tf.io.decode_png(data).numpy(), pixels)
    with pytest.warns(DeprecationWarning):
        data = callbacks.encode_png(pixels[..., 0])
    np.testing.assert_array_equal(tf.io.decode_png(data).numpy()[..., 0],
                                  pixels[..., 0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(TypeError, match="pixels with dtype float32"):
            callbacks.encode_png(np.zeros((2, 2), np.float32))
        with pytest.raises(ValueError,
                           match=r"Received: pixels.shape=\(2, 2, 4\)"):
            callbacks.encode_png(np.zeros((2, 2, 4), np.uint8))


@pytest.mark.parametrize("update_freq, error", [
    (0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError),
    ("epoch", TypeError), (None, TypeError),
])
def test_bad_update_freq(update_freq, error):
    with pytest.raises(error, match=f"Received: update_freq={update_freq!r}"
                       .replace("(", r"\(").replace(".", r"\.")):
        RoutingMonitor(update_freq=update_freq)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"log_dir": 3}, TypeError, "Received: log_dir=3"),
        ({"log_dir": ""}, ValueError, "Received: log_dir=''"),
        ({"heatmap_path": ["a.png"]}, TypeError,
         r"Received: heatmap_path=\['a.png'\]"),
        ({"layers": []}, ValueError, r"Received: layers=\[\]"),
        ({"layers": [3]}, TypeError, r"Received: layers\[0\]=3"),
        ({"per_expert_scalars": "yes"}, TypeError,
         "Received: per_expert_scalars='yes'"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        RoutingMonitor(**kwargs)


def test_numpy_arguments_are_accepted():
    monitor = RoutingMonitor(update_freq=np.int64(3),
                             per_expert_scalars=np.bool_(True))
    assert monitor.update_freq == 3 and monitor.per_expert_scalars is True


def _fit_with(model, monitor):
    x, y = _data()
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0,
              callbacks=[monitor])


def test_model_without_moe_layer():
    inputs = keras.Input((6,))
    model = keras.Model(inputs, keras.layers.Dense(1)(inputs), name="dense")
    model.compile("sgd", "mse")
    with pytest.raises(ValueError, match="no MixtureOfExperts or "
                       "HierarchicalMixtureOfExperts layer"):
        _fit_with(model, RoutingMonitor())


def test_layers_without_routing_metrics():
    model = _model(_flat_layer(routing_metrics=False))
    with pytest.raises(ValueError, match="routing_metrics=False"):
        _fit_with(model, RoutingMonitor())
    with pytest.raises(ValueError, match="routing_metrics=False"):
        _fit_with(model, RoutingMonitor(layers=["moe"]))


@pytest.mark.parametrize("layers, match", [
    (["nope"], "'nope', which is not a layer"),
    (["head"], "not a MixtureOfExperts"),
    ([keras_moe.MixtureOfExperts(2, k=1, name="other")], "not a layer of"),
])
def test_layers_naming_no_moe_layer_of_the_model(layers, match):
    model = _model(_flat_layer())
    with pytest.raises(ValueError, match=match):
        _fit_with(model, RoutingMonitor(layers=layers))


def test_layers_sharing_a_name_in_sub_models():
    # Keras keeps names unique per model only; records keyed by name would
    # interleave two layers' loads.
    def block(i):
        return keras.Sequential([keras.Input((6,)), _flat_layer()],
                                name=f"block_{i}")

    inputs = keras.Input((6,))
    model = keras.Model(inputs, keras.layers.Dense(1)(block(1)(block(0)(inputs))))
    model.compile("sgd", "mse")
    for monitor in (RoutingMonitor(), RoutingMonitor(layers=["moe"])):
        with pytest.raises(ValueError, match=r"several MoE layers named "
                           r"\['moe'\].*its own `name=`"):
            _fit_with(model, monitor)


def test_layers_by_name_or_instance():
    layer = _flat_layer()
    model = _model(layer)
    for layers in (["moe"], "moe", [layer]):
        monitor = RoutingMonitor(layers=layers)
        monitor.set_model(model)
        assert monitor.monitored_layers == [layer]


def test_save_heatmap_errors(tmp_path):
    monitor = RoutingMonitor()
    with pytest.raises(ValueError, match="recorded nothing"):
        monitor.save_heatmap(tmp_path / "x.png")
    monitor._records = {"moe": {"step": [1], "load": [[1.0, 2.0]],
                                "importance": [[1.0, 2.0]]}}
    with pytest.raises(ValueError, match=r"Received: layers=\[\]"):
        monitor.save_heatmap(tmp_path / "x.png", layers=[])
    with pytest.raises(ValueError, match=r"\['other'\] were not recorded"):
        monitor.save_heatmap(tmp_path / "x.png", layers="other")
    with pytest.raises(TypeError, match="Received: renderer=3"):
        monitor.save_heatmap(tmp_path / "x.png", renderer=3)
    assert not (tmp_path / "x.png").exists()


def test_sigmoid_routers_bias_is_recorded_after_each_batch(tmp_path):
    """DeepSeek-V3's bias moves after every training batch (with the
    weights held still): the monitor records it as the layer's state
    after that batch, next to the load the bias was chosen with."""
    def make_layer():
        return keras_moe.MixtureOfExperts(
            NUM_EXPERTS, k=2, name="moe", router="sigmoid_top_k",
            gate_initializer=keras.initializers.RandomNormal(seed=2))

    x, y = _data()
    layer = make_layer()
    model = _model(layer)
    replay = make_layer()
    replay.build((None, 6))
    replay.set_weights(layer.get_weights())
    monitor = RoutingMonitor(log_dir=tmp_path)
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
              callbacks=[monitor])
    expected_bias, expected_load = [], []
    for b in range(NUM_BATCHES):
        _, routing = replay(x[b * BATCH:(b + 1) * BATCH], training=True,
                            return_routing=True)
        expected_load.append(routing["load"].numpy())
        expected_bias.append(replay.gating.expert_bias.numpy())
    history = monitor.history["moe"]
    assert sorted(history) == ["expert_bias", "importance", "load", "step"]
    np.testing.assert_array_equal(history["load"], expected_load)
    assert_close(history["expert_bias"], expected_bias, FORWARD,
                 what="expert_bias")
    assert np.abs(history["expert_bias"][-1]).max() > 0
    events = _read_events(str(tmp_path))
    assert [step for step, _ in events["moe/expert_bias"]] == [1, 2, 3]
    assert events["moe/expert_bias"][0][1].histo.num == NUM_EXPERTS
