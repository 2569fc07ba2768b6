"""Bad arguments and inputs raise errors that name the argument and value."""

import numpy as np
import pytest
import tensorflow as tf

import keras_moe


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"num_experts": 0}, ValueError, "num_experts=0"),
        ({"num_experts": -3}, ValueError, "num_experts=-3"),
        ({"num_experts": 2.5}, TypeError, "num_experts=2.5"),
        ({"num_experts": True}, TypeError, "num_experts=True"),
        ({"num_experts": 4, "k": 0}, ValueError, "k=0"),
        ({"num_experts": 4, "k": 5}, ValueError, "k=5"),
        ({"num_experts": 4, "noise_epsilon": -0.1}, ValueError,
         "noise_epsilon=-0.1"),
        ({"num_experts": 4, "noise_epsilon": float("nan")}, ValueError,
         "noise_epsilon=nan"),
        ({"num_experts": 4, "loss_coef": -1.0}, ValueError, "loss_coef=-1.0"),
        ({"num_experts": 4, "output_dim": 0}, ValueError, "output_dim=0"),
        ({"num_experts": 4, "hidden_sizes": 8}, TypeError, "hidden_sizes=8"),
        ({"num_experts": 4, "hidden_sizes": (8, 0)}, ValueError,
         r"hidden_sizes\[1\]=0"),
        ({"num_experts": 4, "noisy_gating": "yes"}, TypeError,
         "noisy_gating='yes'"),
        ({"num_experts": 4, "seed": -1}, ValueError, "seed=-1"),
        ({"num_experts": 4, "bogus": 1}, ValueError, "bogus"),
    ],
)
def test_constructor_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        keras_moe.MixtureOfExperts(**kwargs)


@pytest.mark.parametrize(
    "cls, kwargs, message",
    [
        (keras_moe.NoisyTopKGating, {"num_experts": 3, "k": 4}, "k=4"),
        (keras_moe.FeedForwardExperts, {"num_experts": 0, "output_dim": 2},
         "num_experts=0"),
    ],
)
def test_sublayer_constructor_arguments(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


@pytest.fixture
def layer():
    layer = keras_moe.MixtureOfExperts(4, k=2)
    layer.build((None, 5))
    return layer


@pytest.mark.parametrize(
    "inputs, error, message",
    [
        (np.zeros((3, 4), "float32"), ValueError, r"inputs.shape=\(3, 4\)"),
        (np.zeros((5,), "float32"), ValueError, r"rank >= 2.*\(5,\)"),
        (np.float32(1.0), ValueError, r"inputs.shape=\(\)"),
        (np.zeros((3, 5), "int32"), TypeError, "inputs.dtype=int32"),
        (np.array([[1.0, np.nan, 0, 0, 0]], "float32"), ValueError,
         "`inputs` contains NaN"),
    ],
)
def test_bad_inputs(layer, inputs, error, message):
    with pytest.raises(error, match=message):
        layer(inputs)


def test_rank_0_and_1_fail_at_build():
    for shape in [(), (5,)]:
        with pytest.raises(ValueError, match="inputs.shape="):
            keras_moe.MixtureOfExperts(4).build(shape)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mask": np.ones((3, 2), bool)}, r"mask.shape=\(3, 2\)"),
        ({"gate_multiplier": np.ones((4,), "float32")},
         r"gate_multiplier.shape=\(4,\)"),
        ({"gate_multiplier": np.ones((3, 1), "float32")},
         r"gate_multiplier.shape=\(3, 1\)"),
        ({"gating_inputs": np.ones((4, 5), "float32")},
         r"gating_inputs.shape=\(4, 5\)"),
        ({"noise": np.ones((3, 3), "float32")}, r"noise.shape=\(3, 3\)"),
    ],
)
def test_mismatched_side_inputs(layer, kwargs, message):
    with pytest.raises(ValueError, match=message):
        layer(np.zeros((3, 5), "float32"), training=True, **kwargs)


def test_gating_inputs_width_after_build(layer):
    # Built for gating inputs of width 5 (the inputs' width).
    with pytest.raises(ValueError, match=r"gating_inputs.shape=\(3, 2\)"):
        layer(np.zeros((3, 5), "float32"),
              gating_inputs=np.zeros((3, 2), "float32"))


def test_integer_side_inputs(layer):
    with pytest.raises(TypeError, match="gate_multiplier.dtype=int32"):
        layer(np.zeros((3, 5), "float32"),
              gate_multiplier=np.ones((3,), "int32"))


@pytest.mark.parametrize("value", [np.nan, np.inf, -0.5])
def test_non_finite_or_negative_gate_multiplier(layer, value):
    multiplier = np.array([1.0, value, 0.5], "float32")
    with pytest.raises(ValueError,
                       match=r"`gate_multiplier` must be finite and >= 0"):
        layer(np.zeros((3, 5), "float32"), gate_multiplier=multiplier)

    @tf.function
    def run(x, multiplier):
        return layer(x, gate_multiplier=multiplier)

    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="gate_multiplier"):
        run(tf.zeros([3, 5]), tf.constant(multiplier))


def test_masked_tokens_gate_multiplier_is_not_read(layer):
    x = np.ones((3, 5), "float32")
    multiplier = np.array([1.0, np.nan, 0.5], "float32")
    mask = np.array([True, False, True])
    y = layer(x, gate_multiplier=multiplier, mask=mask)
    np.testing.assert_array_equal(y.numpy()[1], 0.0)
    assert np.isfinite(y.numpy()).all()


def test_non_finite_noise(layer):
    noise = np.zeros((3, 4), "float32")
    noise[1, 2] = np.nan
    with pytest.raises(ValueError, match="`noise` contains NaN"):
        layer(np.zeros((3, 5), "float32"), training=True, noise=noise)
    # Masked tokens' noise is not read.
    y = layer(np.ones((3, 5), "float32"), training=True, noise=noise,
              mask=np.array([True, False, True]))
    assert np.isfinite(y.numpy()).all()


def test_dynamic_shape_mismatch_inside_tf_function(layer):
    @tf.function(input_signature=[tf.TensorSpec([None, 5]),
                                  tf.TensorSpec([None])])
    def run(x, multiplier):
        return layer(x, gate_multiplier=multiplier)

    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="gate_multiplier"):
        run(tf.zeros([3, 5]), tf.ones([4]))


def test_nan_inside_tf_function_fails_the_step(layer):
    @tf.function
    def run(x):
        return layer(x)

    with pytest.raises(tf.errors.InvalidArgumentError, match="`inputs`"):
        run(tf.constant([[np.nan] * 5]))


def test_unknown_config_keys():
    config = keras_moe.MixtureOfExperts(4).get_config()
    # Keras's from_config re-raises the layer's ValueError as a TypeError
    # that keeps the message.
    with pytest.raises((ValueError, TypeError), match="'bogus': 3"):
        keras_moe.MixtureOfExperts.from_config({**config, "bogus": 3})
    gating_config = keras_moe.NoisyTopKGating(4).get_config()
    with pytest.raises((ValueError, TypeError), match="'extra_key': 1"):
        keras_moe.NoisyTopKGating.from_config({**gating_config,
                                               "extra_key": 1})


def test_gating_rejects_rank_3_and_wrong_noise():
    gating = keras_moe.NoisyTopKGating(3)
    with pytest.raises(ValueError, match=r"rank 2.*\(2, 2, 4\)"):
        gating(np.zeros((2, 2, 4), "float32"))
    gating(np.zeros((2, 4), "float32"))
    with pytest.raises(ValueError, match=r"noise.shape=\(2, 4\)"):
        gating(np.zeros((2, 4), "float32"), training=True,
               noise=np.zeros((2, 4), "float32"))


def test_non_tensorflow_backend_fails_at_import(tmp_path):
    import subprocess
    import sys

    script = "import keras_moe"
    env = {"KERAS_BACKEND": "numpy", "TF_CPP_MIN_LOG_LEVEL": "2",
           "PATH": "/usr/bin:/bin", "KERAS_HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", script], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "ImportError" in result.stderr
    assert "TensorFlow backend" in result.stderr and "'numpy'" in result.stderr


# --------------------------------------------------------------------------
# Finite inputs whose gate logits overflow; NaN gates.
# --------------------------------------------------------------------------


def _overflowing_inputs():
    x = np.ones((4, 4), "float32")
    x[2] = 1e38  # finite, but 4e38 overflows float32
    return x


@pytest.mark.parametrize(
    "make",
    [
        lambda: keras_moe.MixtureOfExperts(4, k=1, gate_initializer="ones"),
        lambda: keras_moe.MixtureOfExperts(4, k=1, gate_initializer="ones",
                                           dispatch="capacity"),
        lambda: keras_moe.HierarchicalMixtureOfExperts(
            2, 2, k=1, group_k=1, gate_initializer="ones"),
    ],
    ids=["sparse", "capacity", "hierarchical"],
)
@pytest.mark.parametrize("training", [False, True])
def test_overflowing_gate_logits_are_refused(make, training):
    """The token used to get NaN gates, zero outputs and a NaN aux_loss
    without a word."""
    layer = make()
    with pytest.raises(ValueError, match=r"`inputs`.*overflow.*inputs\[2\]"):
        layer(_overflowing_inputs(), training=training)


def test_overflowing_gate_logits_under_xla_give_nan_outputs():
    """XLA drops the assertion: the token's outputs are NaN (as for any bad
    input), the others' are what they are without it."""
    layer = keras_moe.MixtureOfExperts(4, k=1, gate_initializer="ones",
                                       dispatch="capacity",
                                       eval_capacity_factor=4.0)
    layer.build((None, 4))
    x = _overflowing_inputs()
    y = tf.function(layer, jit_compile=True)(tf.constant(x)).numpy()
    assert np.isnan(y[2]).all()
    expected = layer(np.delete(x, 2, axis=0)).numpy()
    np.testing.assert_array_equal(np.delete(y, 2, axis=0), expected)


@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize(
    "make",
    [lambda g: keras_moe.SparseDispatcher(2, g),
     lambda g: keras_moe.CapacityDispatcher(2, g, k=1, capacity=2)],
    ids=["sparse", "capacity"],
)
def test_dispatchers_refuse_non_finite_gates(make, value):
    """A NaN gate is not > 0: its row was counted as routed nowhere."""
    gates = np.array([[value, 0.5], [1.0, 0.0]], "float32")
    with pytest.raises(ValueError, match="`gates` contains NaN"):
        make(gates)
    with pytest.raises(tf.errors.InvalidArgumentError, match="`gates`"):
        tf.function(lambda g: make(g).part_sizes)(tf.constant(gates))


def test_capacity_dispatcher_under_xla_combines_non_finite_gates_to_nan():
    gates = tf.constant([[np.nan, 0.5], [1.0, 0.0]])

    @tf.function(jit_compile=True)
    def run(gates):
        dispatcher = keras_moe.CapacityDispatcher(2, gates, k=1, capacity=2)
        return dispatcher.combine(tf.ones([2, 2, 3]))

    out = run(gates).numpy()
    assert np.isnan(out[0]).all()
    np.testing.assert_array_equal(out[1], np.ones(3))
