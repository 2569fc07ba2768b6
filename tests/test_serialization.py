"""Serialization of the keras_moe layers beyond the round trips every layer
passes in tests/test_layer_contract.py (config, `.keras` file): masks,
weights moving between `routing_metrics` settings, files older than the
statistics, SavedModel export (in this process and a fresh one) and
`TFSMLayer`."""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_moe
from numerics import ELEMENTWISE, FORWARD, assert_close

MOE_CONFIGS = {
    "not_noisy_two_hidden": dict(
        num_experts=5,
        k=3,
        hidden_sizes=(7, 5),
        hidden_activation="tanh",
        noisy_gating=False,
    ),
    "custom": dict(
        num_experts=4,
        k=2,
        output_dim=3,
        hidden_sizes=(6,),
        hidden_activation="gelu",
        autoscale=False,
        noise_epsilon=0.05,
        loss_coef=0.1,
        gate_initializer=keras.initializers.RandomNormal(stddev=0.5, seed=1),
        expert_initializer=keras.initializers.HeNormal(seed=2),
        seed=7,
    ),
}


def _randomize_weights(model, seed=0):
    """Random weights everywhere, so the routing is not all ties."""
    rng = np.random.RandomState(seed)
    for variable in model.weights:
        variable.assign(rng.normal(size=variable.shape).astype("float32"))


def _moe_model(config, seed=0):
    inputs = keras.Input((5, 6))
    moe = keras_moe.MixtureOfExperts(**config, name="moe")
    outputs = keras.layers.Dense(3, name="head")(moe(inputs))
    model = keras.Model(inputs, outputs)
    _randomize_weights(model, seed)
    return model


def _inputs(batch=7, seed=1):
    return np.random.RandomState(seed).normal(size=(batch, 5, 6)).astype(
        "float32"
    )


# --------------------------------------------------------------------------
# .keras files
# --------------------------------------------------------------------------


def test_keras_file_round_trip_with_mask(tmp_path):
    inputs = keras.Input((None,), dtype="int32")
    embedded = keras.layers.Embedding(20, 6, mask_zero=True, name="embed")(
        inputs
    )
    hidden = keras_moe.MixtureOfExperts(4, k=2, hidden_sizes=(8,),
                                        name="moe")(embedded)
    outputs = keras.layers.Dense(2, name="head")(hidden)
    model = keras.Model(inputs, outputs)
    _randomize_weights(model)
    tokens = np.array(
        [[3, 5, 7, 0, 0], [1, 2, 3, 4, 5], [9, 0, 0, 0, 0]], "int32"
    )
    expected = model.predict(tokens, verbose=0)
    padded = tokens == 0
    # Masked positions are routed nowhere: the MoE outputs zero there, so
    # the head outputs its bias alone.
    bias = model.get_layer("head").bias.numpy()
    assert_close(expected[padded],
                 np.broadcast_to(bias, expected[padded].shape), ELEMENTWISE,
                 what="padded outputs")
    assert not np.allclose(expected[~padded], bias, atol=1e-3)
    path = str(tmp_path / "masked.keras")
    model.save(path)

    loaded = keras.models.load_model(path, safe_mode=True)

    got = loaded.predict(tokens, verbose=0)
    np.testing.assert_array_equal(got, expected)
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # Padding really is masked in the loaded model: changing a padded
    # position's embedding does not change anything.
    embed = loaded.get_layer("embed")
    table = embed.embeddings.numpy().copy()
    table[0] += 100.0
    embed.embeddings.assign(table)
    assert_close(loaded.predict(tokens, verbose=0), expected, ELEMENTWISE,
                 what="outputs with the padding's embedding changed")


def _trained_routing_model(cls, routing_metrics, fit=True):
    """An MoE layer in a model, compiled and (with `fit`) one epoch
    trained: its optimizer built, as in a model whose weights are saved."""
    inputs = keras.Input((5, 6))
    if cls is keras_moe.MixtureOfExperts:
        layer = cls(4, k=2, hidden_sizes=(5,), name="moe",
                    routing_metrics=routing_metrics)
    else:
        layer = cls(2, 2, k=1, group_k=1, name="moe",
                    routing_metrics=routing_metrics)
    model = keras.Model(
        inputs, keras.layers.Dense(1, name="head")(layer(inputs)))
    _randomize_weights(model)
    model.compile(keras.optimizers.SGD(0.01), "mse")
    if not fit:
        return model, layer
    rng = np.random.default_rng(3)
    model.fit(rng.normal(size=(8, 5, 6)).astype("float32"),
              rng.normal(size=(8, 5, 1)).astype("float32"), verbose=0)
    return model, layer


@pytest.mark.parametrize(
    "cls",
    [keras_moe.MixtureOfExperts, keras_moe.HierarchicalMixtureOfExperts],
)
@pytest.mark.parametrize("saved_with", [True, False])
def test_weights_move_between_routing_metrics_settings(cls, saved_with,
                                                       tmp_path):
    """`routing_metrics` says whether the statistics are tracked, not which
    weights the layer has: weights saved with one setting load into the
    model built with the other (e.g. for serving), both ways."""
    source, _ = _trained_routing_model(cls, saved_with)
    x = _inputs()
    expected = source.predict(x, verbose=0)
    path = str(tmp_path / "model.weights.h5")
    source.save_weights(path)
    target, _ = _trained_routing_model(cls, not saved_with)
    assert [w.path for w in target.weights] == [
        w.path for w in source.weights]
    target.load_weights(path)
    for got, want in zip(target.weights, source.weights):
        np.testing.assert_array_equal(got.numpy(), want.numpy(),
                                      err_msg=want.path)
    np.testing.assert_array_equal(target.predict(x, verbose=0), expected)
    # `set_weights` moves the layers' weights only: no optimizer to build.
    target, _ = _trained_routing_model(cls, not saved_with, fit=False)
    target.set_weights(source.get_weights())
    np.testing.assert_array_equal(target.predict(x, verbose=0), expected)
    # A whole .keras file with one setting, loaded and rebuilt with the
    # other through its config.
    keras_path = str(tmp_path / "model.keras")
    source.save(keras_path)
    config = source.get_config()
    for layer_config in config["layers"]:
        if layer_config["config"]["name"] == "moe":
            layer_config["config"]["routing_metrics"] = not saved_with
    rebuilt = keras.Model.from_config(config)
    rebuilt.load_weights(keras_path)
    np.testing.assert_array_equal(rebuilt.predict(x, verbose=0), expected)


def test_weights_saved_without_statistics_still_load(tmp_path):
    """Files written before the statistics existed whatever
    `routing_metrics` hold none for a `routing_metrics=False` layer."""
    import h5py

    source, _ = _trained_routing_model(keras_moe.MixtureOfExperts, False)
    path = str(tmp_path / "model.weights.h5")
    source.save_weights(path)
    with h5py.File(path, "a") as f:
        own = f["layers/mixture_of_experts/vars"]
        for key in list(own.keys()):
            del own[key]
    x = _inputs()
    target, _ = _trained_routing_model(keras_moe.MixtureOfExperts, True)
    target.load_weights(path)
    np.testing.assert_array_equal(target.predict(x, verbose=0),
                                  source.predict(x, verbose=0))


# --------------------------------------------------------------------------
# SavedModel export
# --------------------------------------------------------------------------

EXPORT_CONFIGS = [
    pytest.param(MOE_CONFIGS["not_noisy_two_hidden"], id="not_noisy"),
    pytest.param(MOE_CONFIGS["custom"], id="custom"),
]


@pytest.mark.parametrize("config", EXPORT_CONFIGS)
def test_export_serve_matches_predict(config, tmp_path):
    model = _moe_model(config)
    x = _inputs(batch=7)
    other_batch = _inputs(batch=3, seed=2)
    expected = model.predict(x, verbose=0)
    export_dir = str(tmp_path / "exported")
    model.export(export_dir, verbose=False)

    served = tf.saved_model.load(export_dir)
    assert_close(served.serve(x).numpy(), expected, FORWARD, what="serve")
    # Any batch size, and deterministically (no noise in serving).
    assert_close(served.serve(other_batch).numpy(),
                 model.predict(other_batch, verbose=0), FORWARD,
                 what="serve, another batch")
    np.testing.assert_array_equal(served.serve(x).numpy(),
                                  served.serve(x).numpy())

    # Through keras.layers.TFSMLayer, alone and inside a new model.
    reloaded = keras.layers.TFSMLayer(export_dir, call_endpoint="serve")
    assert_close(np.asarray(reloaded(x)), expected, FORWARD,
                 what="TFSMLayer")
    inputs = keras.Input((5, 6))
    wrapper = keras.Model(inputs, reloaded(inputs))
    assert_close(wrapper.predict(x, verbose=0), expected, FORWARD,
                 what="TFSMLayer in a model")


_FRESH_PROCESS_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import tensorflow as tf

    # Nothing of keras_moe is imported: each SavedModel stands alone.
    for export_dir, input_path, output_path in zip(*[iter(sys.argv[1:])] * 3):
        served = tf.saved_model.load(export_dir)
        x = np.load(input_path)
        np.save(output_path, served.serve(tf.constant(x)).numpy())
    assert "keras_moe" not in sys.modules, "keras_moe was imported"
    """
)


def test_export_serves_in_fresh_process(tmp_path):
    """SavedModels of several configs, served by a process that has never
    imported keras_moe (one subprocess for all: TensorFlow's import is the
    slow part)."""
    args, expected = [], {}
    for param in EXPORT_CONFIGS:
        (config,) = param.values
        name = param.id
        model = _moe_model(config)
        x = _inputs(batch=4, seed=3)
        expected[name] = model.predict(x, verbose=0)
        export_dir = tmp_path / f"{name}_exported"
        model.export(str(export_dir), verbose=False)
        np.save(tmp_path / f"{name}_x.npy", x)
        args += [str(export_dir), str(tmp_path / f"{name}_x.npy"),
                 str(tmp_path / f"{name}_y.npy")]
    script_path = tmp_path / "serve.py"
    script_path.write_text(_FRESH_PROCESS_SCRIPT)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(
        [sys.executable, str(script_path), *args],
        env=env, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for name, want in expected.items():
        got = np.load(tmp_path / f"{name}_y.npy")
        assert_close(got, want, FORWARD, what=name)
