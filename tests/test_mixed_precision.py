"""`MixtureOfExperts` under the mixed-precision dtype policies.

The house rule: gating math (logits, noise, softmax, top-k, normal CDF,
CV^2) stays float32 under every policy; the experts run in the compute
dtype; variables are float32.
"""

import keras
import numpy as np
import pytest

import keras_moe
from numerics import FORWARD, UNIT, assert_close, closeness, tolerance

POLICIES = [
    pytest.param("mixed_float16", "float16", id="mixed_float16"),
    pytest.param("mixed_bfloat16", "bfloat16", id="mixed_bfloat16"),
]

# The outputs against the float32 layer's, by the rule of tests/numerics.py
# with the tolerance set by the compute dtype's precision, not float32's:
# one rounding in float16 (eps 9.8e-4, 11 significant bits) is 512 of
# numerics' UNIT (16 float32 eps), one in bfloat16 (eps 7.8e-3, 8 bits)
# 4096; a forward pass rounds at FORWARD stages. (tol: 7.8e-3 and 6.3e-2
# of the outputs' scale.)
EPS = {"float16": 2.0**-10, "bfloat16": 2.0**-7}
DEPTH = {dtype: FORWARD * round(eps / UNIT) for dtype, eps in EPS.items()}

MOE_KWARGS = dict(num_experts=6, k=2, output_dim=5, hidden_sizes=(16,))


def _inputs(seed=0, shape=(4, 10, 8)):
    return np.random.RandomState(seed).normal(size=shape).astype("float32")


def _float32_and_mixed_layers(policy, use_global_policy, **overrides):
    """A float32 layer and a mixed-precision one with the same weights."""
    kwargs = {**MOE_KWARGS, **overrides}
    reference = keras_moe.MixtureOfExperts(**kwargs, dtype="float32")
    if use_global_policy:
        keras.config.set_dtype_policy(policy)
        layer = keras_moe.MixtureOfExperts(**kwargs)
    else:
        layer = keras_moe.MixtureOfExperts(**kwargs, dtype=policy)
    x = _inputs()
    reference.build(x.shape)
    layer.build(x.shape)
    rng = np.random.RandomState(1)
    for variable in reference.weights:
        variable.assign(rng.normal(size=variable.shape).astype("float32"))
    layer.set_weights(reference.get_weights())
    return reference, layer, x


def _assert_outputs_close(got, want, compute_dtype):
    assert_close(got, want, DEPTH[compute_dtype],
                 what=f"{compute_dtype} outputs vs float32")


@pytest.mark.parametrize("policy, compute_dtype", POLICIES)
def test_dtypes_of_variables_outputs_and_routing_under_global_policy(
    policy, compute_dtype
):
    # With the policy as the `dtype` argument, tests/test_layer_contract.py
    # checks the same outputs, routing, losses and variables; here the
    # global policy, and the sublayers' dtypes.
    _, layer, x = _float32_and_mixed_layers(policy, use_global_policy=True)
    assert layer.compute_dtype == compute_dtype
    assert layer.gating.compute_dtype == compute_dtype
    assert layer.experts.compute_dtype == compute_dtype
    # Variables: float32, the gating ones and the experts' alike.
    variables = [layer.gating.gate_kernel, layer.gating.noise_kernel,
                 *layer.experts.kernels]
    assert len(layer.trainable_weights) == len(variables) == 4
    # The last batch's statistics (for callbacks) are float32 too.
    variables += [layer.last_importance, layer.last_load]
    assert len(layer.weights) == len(variables)
    for variable in variables:
        assert variable.dtype == "float32", variable.path

    for training in (False, True):
        outputs, routing = layer(x, training=training, return_routing=True)
        assert outputs.dtype == compute_dtype, training
        for name in ("gates", "importance", "load", "aux_loss"):
            assert routing[name].dtype == "float32", (name, training)
        assert np.all(np.isfinite(np.asarray(routing["aux_loss"])))
        assert len(layer.losses) == 1
        assert layer.losses[0].dtype == "float32"
    # The gating sublayer alone also returns float32 under the policy.
    gates, load = layer.gating(x.reshape(-1, 8), training=True)
    assert gates.dtype == "float32" and load.dtype == "float32"
    # Symbolic outputs agree with the eager ones.
    symbolic = layer(keras.KerasTensor((None, 10, 8)), return_routing=True)
    assert symbolic[0].dtype == compute_dtype
    assert symbolic[1]["gates"].dtype == "float32"


@pytest.mark.parametrize("hidden_sizes", [(), (16,)], ids=["linear", "hidden"])
@pytest.mark.parametrize("policy, compute_dtype", POLICIES)
def test_matches_float32_layer(policy, compute_dtype, hidden_sizes):
    reference, layer, x = _float32_and_mixed_layers(
        policy, use_global_policy=False, hidden_sizes=hidden_sizes
    )
    want, want_routing = reference(x, return_routing=True)
    got, routing = layer(x, return_routing=True)
    _assert_outputs_close(got, want, compute_dtype)
    # Not identical either: the experts really ran in lower precision,
    # further from float32 than float32's own rounding would take them.
    assert closeness(got, want) > tolerance(FORWARD), closeness(got, want)

    # Float32 gating on float32 inputs: the same routing, the same gates,
    # the same statistics as the float32 layer.
    want_gates = np.asarray(want_routing["gates"])
    gates = np.asarray(routing["gates"])
    np.testing.assert_array_equal(gates > 0, want_gates > 0)
    assert_close(gates, want_gates, FORWARD, what="gates")
    for name in ("importance", "load", "aux_loss"):
        assert_close(routing[name], want_routing[name], FORWARD, what=name)
    np.testing.assert_array_equal(np.asarray(routing["part_sizes"]),
                                  np.asarray(want_routing["part_sizes"]))


@pytest.mark.parametrize("policy, compute_dtype", POLICIES)
def test_training_routing_matches_float32_with_same_noise(policy,
                                                          compute_dtype):
    """With the same noise draw, noisy routing and load are float32-exact."""
    reference, layer, x = _float32_and_mixed_layers(policy, False)
    noise = np.random.RandomState(5).normal(size=(4, 10, 6)).astype("float32")
    want, want_routing = reference(x, training=True, noise=noise,
                                   return_routing=True)
    got, routing = layer(x, training=True, noise=noise, return_routing=True)
    assert_close(routing["gates"], want_routing["gates"], FORWARD,
                 what="gates")
    assert_close(routing["load"], want_routing["load"], FORWARD, what="load")
    _assert_outputs_close(got, want, compute_dtype)


@pytest.mark.parametrize("policy, compute_dtype", POLICIES)
def test_fit_step(policy, compute_dtype):
    keras.config.set_dtype_policy(policy)
    inputs = keras.Input((10, 8))
    moe = keras_moe.MixtureOfExperts(
        6, k=2, hidden_sizes=(16,), gate_initializer="random_normal",
        loss_coef=0.1, name="moe",
    )
    hidden = moe(inputs)
    # Float32 head, as the Keras mixed-precision guide recommends.
    outputs = keras.layers.Dense(3, dtype="float32")(hidden)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="adam", loss="mse")
    x = _inputs()
    y = np.random.RandomState(2).normal(size=(4, 10, 3)).astype("float32")
    before = {v.path: v.numpy().copy() for v in model.trainable_weights}

    history = model.fit(x, y, batch_size=4, epochs=2, verbose=0)

    losses = history.history["loss"]
    assert len(losses) == 2 and np.all(np.isfinite(losses)), losses
    changed = {
        path: not np.array_equal(v.numpy(), before[path])
        for path, v in ((v.path, v) for v in model.trainable_weights)
    }
    # Every variable moved: expert kernels, the gate kernel and (through
    # the smooth load and the balancing loss) the noise kernel.
    assert all(changed.values()), changed
    for v in model.trainable_weights:
        assert v.dtype == "float32", v.path
        assert np.all(np.isfinite(v.numpy())), v.path

    # The balancing loss is a float32 scalar, and it is part of the loss.
    outputs = model(x, training=True)
    assert outputs.dtype == "float32"
    assert len(moe.losses) == 1
    aux = moe.losses[0]
    assert aux.dtype == "float32" and aux.shape == ()
    assert np.isfinite(float(aux)) and float(aux) > 0.0
    assert model.losses and all(loss.dtype == "float32"
                                for loss in model.losses)
