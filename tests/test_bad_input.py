"""Bad arguments and inputs raise errors that name the argument and value."""

import re

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


# --------------------------------------------------------------------------
# Errors that name the argument, not a TensorFlow internal.
# --------------------------------------------------------------------------


def test_ragged_and_sparse_arguments(layer):
    ragged = tf.ragged.constant([[[1.0] * 5], [[1.0] * 5] * 2], ragged_rank=1)
    with pytest.raises(TypeError, match="`inputs` must be a dense tensor"):
        layer(ragged)
    x = np.ones((2, 5), "float32")
    with pytest.raises(TypeError,
                       match="`gate_multiplier` must be a dense tensor"):
        layer(x, gate_multiplier=tf.sparse.from_dense([1.0, 1.0]))
    with pytest.raises(TypeError, match="`mask` must be a dense tensor"):
        layer(x, mask=tf.ragged.constant([[True], [True]]))


def test_unknown_rank_inputs(layer):
    for call in (layer, layer.gating):
        with pytest.raises(ValueError,
                           match=r"`inputs` must have a known rank.*"
                                 r"inputs.shape=<unknown rank>"):
            tf.function(lambda x: call(x),
                        input_signature=[tf.TensorSpec(None)]
                        ).get_concrete_function()


def test_unknown_rank_inputs_at_first_call():
    layer = keras_moe.MixtureOfExperts(4)
    with pytest.raises(ValueError, match="`inputs` must have a known rank"):
        tf.function(lambda x: layer(x), input_signature=[tf.TensorSpec(None)]
                    ).get_concrete_function()


GATES_3 = np.array([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]], "float32")


def test_sparse_combine_names_expert_out():
    dispatcher = keras_moe.SparseDispatcher(3, GATES_3)  # part_sizes 2, 1, 0
    # Three rows in all, as many as routed, but not expert by expert: this
    # used to combine rows with the wrong experts' gates, silently.
    with pytest.raises(ValueError, match=r"expert_out\[0\].*\(2\).*"
                                         r"expert_out\[0\].shape=\(1, 4\)"):
        dispatcher.combine([np.ones((1, 4), "float32"),
                            np.ones((2, 4), "float32"),
                            np.ones((0, 4), "float32")])
    with pytest.raises(ValueError, match=r"expert_out\[1\].shape=\(1, 5\)"):
        dispatcher.combine([np.ones((2, 4), "float32"),
                            np.ones((1, 5), "float32"),
                            np.ones((0, 4), "float32")])
    with pytest.raises(TypeError, match="expert_out.dtype=int32"):
        dispatcher.combine([np.ones((2, 4), "int32"), np.ones((1, 4), "int32"),
                            np.ones((0, 4), "int32")])

    @tf.function
    def run(first):
        return dispatcher.combine([first, tf.ones([1, 4]), tf.ones([0, 4])])

    with pytest.raises(tf.errors.InvalidArgumentError, match=r"expert_out\[0\]"):
        run.get_concrete_function(tf.TensorSpec([None, 4]))(tf.ones([3, 4]))


@pytest.mark.parametrize("shape", [(3, 2, 4), (2, 3, 4), (4,)])
def test_capacity_combine_checks_the_slabs(shape):
    dispatcher = keras_moe.CapacityDispatcher(2, GATES_3[:, :2], k=2,
                                              capacity=2)
    with pytest.raises(ValueError, match=r"\[2, 2, \.\.\.\].*expert_out.shape="
                                         + re.escape(str(shape))):
        dispatcher.combine(np.ones(shape, "float32"))


def test_capacity_combine_checks_a_dynamic_capacity():
    @tf.function
    def run(gates, expert_out):
        capacity = tf.shape(gates)[0]
        dispatcher = keras_moe.CapacityDispatcher(2, gates, k=2,
                                                  capacity=capacity)
        return dispatcher.combine(expert_out)

    run = run.get_concrete_function(tf.TensorSpec([None, 2]),
                                    tf.TensorSpec([2, None, 4]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="one slab"):
        run(tf.constant(GATES_3[:, :2]), tf.ones([2, 3, 4]))


def test_capacity_dispatch_checks_the_rows():
    dispatcher = keras_moe.CapacityDispatcher(2, GATES_3[:, :2], k=2,
                                              capacity=2)
    with pytest.raises(ValueError, match=r"`inp`.*inp.shape=\(3, 4\)"):
        dispatcher.dispatch(np.ones((3, 4), "float32"))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: keras_moe.MixtureOfExperts(4, k=2),
         'dispatch="sparse".*does not compile with XLA.*dispatch="capacity"'),
        (lambda: keras_moe.HierarchicalMixtureOfExperts(2, 2),
         "HierarchicalMixtureOfExperts.*does not compile with XLA"),
    ],
    ids=["flat", "hierarchical"],
)
def test_sparse_dispatch_under_xla_says_so(make, message):
    """Instead of a SplitV compile-time-constant error."""
    layer = make()
    with pytest.raises(ValueError, match=message):
        tf.function(layer, jit_compile=True)(tf.ones([3, 5]))


def test_sparse_dispatcher_under_xla_says_so():
    @tf.function(jit_compile=True)
    def run(gates):
        return keras_moe.SparseDispatcher(3, gates).part_sizes

    with pytest.raises(ValueError,
                       match="SparseDispatcher does not compile with XLA.*"
                             "CapacityDispatcher"):
        run(tf.constant(GATES_3))


def _routing():
    layer = keras_moe.MixtureOfExperts(3, k=2,
                                       gate_initializer="random_normal")
    return layer(np.random.default_rng(0).normal(size=(4, 5)).astype(
        "float32"), return_routing=True)[1]


def test_expert_to_tokens_with_an_inconsistent_routing():
    routing = _routing()
    with pytest.raises(TypeError, match="routing of type list"):
        keras_moe.expert_to_tokens([routing])
    without = {k: v for k, v in routing.items() if k != "token_index"}
    with pytest.raises(ValueError, match=r"without \['token_index'\]"):
        keras_moe.expert_to_tokens(without)
    more = dict(routing, part_sizes=routing["part_sizes"] + 1)
    with pytest.raises(ValueError, match=r"inconsistent.*token_index"):
        keras_moe.expert_to_tokens(more)
    fewer = dict(routing, expert_gates=routing["expert_gates"][:-1])
    with pytest.raises(ValueError, match=r"inconsistent.*expert_gates"):
        keras_moe.expert_to_gates(fewer)
    negative = dict(routing, part_sizes=tf.constant([-1, 5, 4]))
    with pytest.raises(ValueError, match="inconsistent"):
        keras_moe.expert_to_tokens(negative)
    floats = dict(routing, part_sizes=tf.cast(routing["part_sizes"],
                                              tf.float32))
    with pytest.raises(TypeError, match="part_sizes'\\].dtype=float32"):
        keras_moe.expert_to_tokens(floats)

    @tf.function
    def run(token_index):
        return keras_moe.expert_to_tokens(dict(routing,
                                               token_index=token_index))

    with pytest.raises(tf.errors.InvalidArgumentError, match="inconsistent"):
        run.get_concrete_function(tf.TensorSpec([None], tf.int64))(
            routing["token_index"][:-1])
