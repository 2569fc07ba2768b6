"""The routers of keras_moe.routers and MixtureOfExperts composed with each,
against NumPy references of their papers' equations: the experts chosen
(exactly), gates, outputs, the balancing losses and the z-loss, and the
gradient of all that with respect to the gate kernel (central differences
of the float64 reference). Then what each router adds (DeepSeek-V3's bias,
jitter, expert choice's slots, the shared expert), a user's Router, the
refusals, and the router variants under tf.distribute, expert parallelism
and export. (The layer contract, mixed precision included, is in
test_layer_contract.py; the noisy top-k router is the original's, checked
against its fixtures in test_parity.py.)"""

import contextlib

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_moe
from keras_moe import routers
from numerics import ELEMENTWISE, FORWARD, GRADIENT, STEP, assert_close
from strategies import mirrored

D, E, H = 4, 4, 5


# --------------------------------------------------------------------------
# NumPy references, float64
# --------------------------------------------------------------------------


def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(-1, keepdims=True)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _logsumexp(z):
    top = z.max(-1)
    return top + np.log(np.exp(z - top[:, None]).sum(-1))


def _top_k(scores, k):
    """Indices of each row's k largest, ties to the lower index."""
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def _token_choice(router, logits, k, normalize, bias):
    """`(expert_index, gates, probabilities)` of a token-choice router."""
    if router in ("softmax_top_k", "switch"):
        # Mixtral: softmax over all experts, top k, renormalized or not;
        # Switch: top 1, gate = its probability (Fedus et al. 2021, eq. 2).
        probabilities = _softmax(logits)
        index = _top_k(probabilities, k)
        gates = np.take_along_axis(probabilities, index, 1)
    else:
        # DeepSeek-V3 (eq. 13-16): sigmoid scores, chosen by score + bias,
        # gated by the scores normalized over the chosen.
        scores = _sigmoid(logits)
        index = _top_k(scores + bias, k)
        gates = np.take_along_axis(scores, index, 1)
        probabilities = scores / scores.sum(1, keepdims=True)
    if normalize and router != "switch":
        gates = gates / gates.sum(1, keepdims=True)
    return index, gates, probabilities


def _expert_outputs(kernels, x):
    """Every expert on every token: `[E, tokens, out]` (ReLU hidden layer,
    no autoscale)."""
    hidden = np.maximum(np.einsum("td,edh->eth", x, kernels[0]), 0.0)
    return np.einsum("eth,eho->eto", hidden, kernels[1])


def _reference(router, x, gate_kernel, kernels, k, normalize=True,
               bias=None, mask=None, multiplier=None, capacity=None,
               loss_coef=0.0, z_coef=0.0):
    """The MoE layer by its paper's equations: outputs, dense gates,
    counts per expert, auxiliary loss and dropped fraction."""
    tokens = len(x)
    mask = np.ones(tokens, bool) if mask is None else mask
    multiplier = np.ones(tokens) if multiplier is None else multiplier
    x = np.where(mask[:, None], x, 0.0)
    logits = x @ gate_kernel
    gates = np.zeros((tokens, E))
    dropped = None
    if router == "expert_choice":
        # Zhou et al. (2022): S = softmax(X W); expert e takes the
        # `capacity` tokens of largest S[:, e], each with gate S[t, e].
        probabilities = _softmax(logits)
        choosable = np.where(mask[:, None], probabilities, -1.0)
        for e in range(E):
            chosen = np.argsort(-choosable[:, e], kind="stable")[:capacity]
            gates[chosen, e] = probabilities[chosen, e]
        counts = (gates > 0).sum(0).astype(float)
        dropped = (mask & ~(gates > 0).any(1)).sum() / mask.sum()
        balance_value = 0.0
    else:
        index, top_gates, probabilities = _token_choice(
            router, logits, k, normalize, bias)
        np.put_along_axis(gates, index, top_gates, 1)
        counts = np.bincount(index[mask].ravel(), minlength=E).astype(float)
        # Fedus et al. (2021), eq. 4: E * sum_i f_i * P_i, f the fraction
        # of routed pairs, P the mean router probability.
        fraction = counts / counts.sum()
        balance_value = E * np.sum(fraction * probabilities[mask].mean(0))
    gates *= (mask * multiplier)[:, None]
    outputs = np.einsum("te,eto->to", gates, _expert_outputs(kernels, x))
    # Zoph et al. (2022), eq. 5: mean over tokens of logsumexp(logits)^2.
    z_loss = np.mean(_logsumexp(logits[mask]) ** 2)
    aux_loss = loss_coef * balance_value + z_coef * z_loss
    return outputs, gates, counts, aux_loss, dropped


def _numeric_gradient(f, w, eps=1e-6):
    """d f / d w by central differences (f of a float64 array)."""
    gradient = np.zeros_like(w)
    for i in np.ndindex(w.shape):
        step = np.zeros_like(w)
        step[i] = eps
        gradient[i] = (f(w + step) - f(w - step)) / (2 * eps)
    return gradient


# --------------------------------------------------------------------------
# Every router in the layer, against the reference
# --------------------------------------------------------------------------


def _layer(router, k, dispatch="sparse", **kwargs):
    layer = keras_moe.MixtureOfExperts(E, k=k, router=router, **{
        "hidden_sizes": (H,), "autoscale": False, "dispatch": dispatch,
        # No token dropped in inference.
        "eval_capacity_factor": float(E), "min_capacity": 1,
        "gate_initializer": keras.initializers.RandomNormal(stddev=1.0,
                                                            seed=1),
        "expert_initializer": keras.initializers.GlorotUniform(seed=2),
        **kwargs})
    layer.build((None, D))
    return layer


def _inputs(tokens=10, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(tokens, D)).astype("float32")
    mask = np.arange(tokens) % 4 != 1
    multiplier = rng.uniform(0.5, 1.5, tokens).astype("float32")
    # Masked tokens are never read.
    x[~mask] = np.nan
    return x, mask, multiplier


def _weights64(layer):
    return (layer.gating.gate_kernel.numpy().astype(np.float64),
            [kernel.numpy().astype(np.float64)
             for kernel in layer.experts.kernels])


TOKEN_CHOICE = [
    pytest.param("softmax_top_k", 2, True, id="softmax_top_k"),
    pytest.param("softmax_top_k", 2, False, id="softmax_top_k-unnormalized"),
    pytest.param("switch", 1, True, id="switch"),
    pytest.param("sigmoid_top_k", 2, True, id="sigmoid_top_k"),
]


@pytest.mark.parametrize("dispatch", ["sparse", "capacity"])
@pytest.mark.parametrize("router, k, normalize", TOKEN_CHOICE)
def test_token_choice_routers_follow_their_equations(router, k, normalize,
                                                     dispatch):
    layer = _layer(router, k, dispatch, normalize_top_k=normalize,
                   loss_coef=0.5, router_z_loss_coef=0.1)
    bias = None
    if router == "sigmoid_top_k":
        # A bias that moves some tokens' choice (scores are in (0, 1)).
        bias = np.array([0.3, -0.2, 0.1, 0.0])
        layer.gating.expert_bias.assign(bias)
    x, mask, multiplier = _inputs()
    upstream = np.random.default_rng(5).normal(size=(len(x), D))
    gate_kernel, kernels = _weights64(layer)

    def reference(w):
        return _reference(router, np.nan_to_num(x).astype(np.float64), w,
                          kernels, k, normalize, bias, mask, multiplier,
                          loss_coef=0.5, z_coef=0.1)

    outputs, gates, counts, aux_loss, _ = reference(gate_kernel)
    with tf.GradientTape() as tape:
        y, routing = layer(x, mask=mask, gate_multiplier=multiplier,
                           return_routing=True)
        loss = tf.reduce_sum(y * upstream) + routing["aux_loss"]
    gradient = tape.gradient(loss, layer.gating.gate_kernel)

    # The experts chosen, exactly; gates, outputs, losses by the rule.
    np.testing.assert_array_equal(routing["gates"].numpy() != 0, gates != 0)
    np.testing.assert_array_equal(routing["part_sizes"], counts)
    np.testing.assert_array_equal(routing["load"], counts)
    assert_close(routing["gates"], gates, FORWARD, what="gates")
    assert_close(routing["importance"], gates.sum(0), FORWARD,
                 what="importance")
    assert_close(y, outputs, FORWARD, what="outputs")
    assert_close(routing["aux_loss"], aux_loss, FORWARD, what="aux_loss")
    assert len(layer.losses) == 1
    numeric = _numeric_gradient(
        lambda w: np.sum(reference(w)[0] * upstream) + reference(w)[3],
        gate_kernel)
    assert np.abs(numeric).max() > 1e-3
    assert_close(gradient, numeric, GRADIENT, what="gate kernel gradient")


def test_expert_choice_follows_its_equations():
    capacity_factor = 0.5
    layer = _layer("expert_choice", 1, "capacity", router_z_loss_coef=0.1,
                   eval_capacity_factor=capacity_factor)
    x, mask, multiplier = _inputs()
    # ceil(capacity_factor * tokens * k / E) slots per expert.
    capacity = int(np.ceil(capacity_factor * len(x) * 1 / E))
    upstream = np.random.default_rng(6).normal(size=(len(x), D))
    gate_kernel, kernels = _weights64(layer)

    def reference(w):
        return _reference("expert_choice", np.nan_to_num(x).astype(
            np.float64), w, kernels, 1, mask=mask, multiplier=multiplier,
            capacity=capacity, z_coef=0.1)

    outputs, gates, counts, aux_loss, dropped = reference(gate_kernel)
    assert 0 < dropped < 1
    with tf.GradientTape() as tape:
        y, routing = layer(x, mask=mask, gate_multiplier=multiplier,
                           return_routing=True)
        loss = tf.reduce_sum(y * upstream) + routing["aux_loss"]
    gradient = tape.gradient(loss, layer.gating.gate_kernel)
    np.testing.assert_array_equal(routing["gates"].numpy() != 0, gates != 0)
    np.testing.assert_array_equal(routing["part_sizes"], [capacity] * E)
    np.testing.assert_array_equal(routing["load"], counts)
    assert_close(routing["gates"], gates, FORWARD, what="gates")
    assert_close(y, outputs, FORWARD, what="outputs")
    # No balancing loss by default: the z-loss alone.
    assert_close(routing["aux_loss"], aux_loss, FORWARD, what="aux_loss")
    assert_close(routing["dropped_fraction"], dropped, ELEMENTWISE,
                 what="dropped_fraction")
    # The pairs, sorted by expert then token.
    pairs = np.stack([routing["expert_index"], routing["token_index"]], 1)
    want = np.argwhere(gates.T != 0)
    np.testing.assert_array_equal(pairs, want)
    assert_close(routing["expert_gates"], gates.T[gates.T != 0], FORWARD)
    numeric = _numeric_gradient(
        lambda w: np.sum(reference(w)[0] * upstream) + reference(w)[3],
        gate_kernel)
    assert_close(gradient, numeric, GRADIENT, what="gate kernel gradient")


def test_the_equations_catch_a_wrong_gate():
    # The comparison above fails when the gates are off: here the
    # unnormalized softmax top-k against the normalized reference.
    layer = _layer("softmax_top_k", 2, normalize_top_k=False)
    x, mask, multiplier = _inputs()
    gate_kernel, kernels = _weights64(layer)
    outputs, gates, *_ = _reference(
        "softmax_top_k", np.nan_to_num(x).astype(np.float64), gate_kernel,
        kernels, 2, True, None, mask, multiplier)
    y, routing = layer(x, mask=mask, gate_multiplier=multiplier,
                       return_routing=True)
    with pytest.raises(AssertionError, match="gates"):
        assert_close(routing["gates"], gates, FORWARD, what="gates")
    with pytest.raises(AssertionError, match="outputs"):
        assert_close(y, outputs, FORWARD, what="outputs")


def test_noisy_top_k_routes_as_its_gating_call():
    # The original router's `route` is its `call`, as a routing dict.
    gating = keras_moe.NoisyTopKGating(E, k=2,
                                       kernel_initializer="random_normal")
    x = np.random.default_rng(1).normal(size=(6, D)).astype("float32")
    noise = np.random.default_rng(2).normal(size=(6, E)).astype("float32")
    mask = np.array([1, 1, 0, 1, 0, 1], bool)
    gates, load = gating(x, training=True, noise=noise, mask=mask)
    routing = gating.route(x, training=True, noise=noise, mask=mask)
    dense = np.zeros((6, E), np.float32)
    np.put_along_axis(dense, routing["expert_index"].numpy(),
                      routing["expert_gates"].numpy(), 1)
    np.testing.assert_array_equal(dense, gates)
    np.testing.assert_array_equal(routing["load"], load)
    np.testing.assert_array_equal(routing["probabilities"].numpy()[~mask], 0)


# --------------------------------------------------------------------------
# What each router adds
# --------------------------------------------------------------------------


def test_sigmoid_bias_chooses_without_weighing_and_follows_the_load():
    layer = _layer("sigmoid_top_k", 1, normalize_top_k=False)
    x = np.random.default_rng(3).normal(size=(12, D)).astype("float32")
    gate_kernel, _ = _weights64(layer)
    scores = _sigmoid(x.astype(np.float64) @ gate_kernel)
    # A training call: chosen with a zero bias, then the bias moves by
    # u * sign(mean load - load), u = 1e-3.
    _, routing = layer(x, training=True, return_routing=True)
    counts = np.bincount(scores.argmax(1), minlength=E)
    np.testing.assert_array_equal(routing["load"], counts)
    assert len(set(counts)) > 1
    np.testing.assert_array_equal(
        layer.gating.expert_bias.numpy(),
        np.float32(1e-3) * np.sign(counts.mean() - counts).astype("float32"))
    assert not layer.gating.expert_bias.trainable
    # A large bias sends every token to expert 3, gated by its score alone.
    layer.gating.expert_bias.assign([0.0, 0.0, 0.0, 5.0])
    _, routing = layer(x, return_routing=True)
    np.testing.assert_array_equal(routing["part_sizes"], [0, 0, 0, 12])
    assert_close(routing["gates"].numpy()[:, 3], scores[:, 3], FORWARD)
    # Inference leaves the bias alone.
    np.testing.assert_array_equal(layer.gating.expert_bias.numpy(),
                                  [0.0, 0.0, 0.0, 5.0])


def test_jitter_scales_the_router_input_while_training_only():
    router = routers.SoftmaxTopKRouter(D, k=1, jitter=0.1, seed=3)
    router.build((None, D))
    router.gate_kernel.assign(np.eye(D))  # logits = the jittered input
    x = np.random.default_rng(4).uniform(1, 2, (50, D)).astype("float32")
    ratio = router(x, training=True)["logits"].numpy() / x
    assert ratio.min() >= 0.9 - 1e-6 and ratio.max() <= 1.1 + 1e-6
    assert ratio.std() > 0.03
    assert not np.array_equal(router(x, training=True)["logits"],
                              router(x, training=True)["logits"])
    np.testing.assert_array_equal(router(x)["logits"], x)
    # The same seed, the same draws.
    again = routers.SoftmaxTopKRouter(D, k=1, jitter=0.1, seed=3)
    again.build((None, D))
    again.gate_kernel.assign(np.eye(D))
    np.testing.assert_array_equal(again(x, training=True)["logits"],
                                  ratio * x)


def test_expert_choice_with_more_slots_than_tokens_leaves_slots_empty():
    router = routers.ExpertChoiceRouter(3, k=1,
                                        kernel_initializer="random_normal")
    x = np.random.default_rng(5).normal(size=(4, D)).astype("float32")
    mask = np.array([True, False, True, True])
    routing = router(x, mask=mask, capacity=5)
    index = routing["token_index"].numpy()
    # Each expert takes the 3 unmasked tokens; the other slots are empty
    # (token 4, gate 0).
    np.testing.assert_array_equal(np.sort(index, 1),
                                  [[0, 2, 3, 4, 4]] * 3)
    np.testing.assert_array_equal(routing["token_gates"].numpy()[index == 4],
                                  0.0)


def test_shared_expert_is_added_to_every_token_with_its_gate():
    layer = _layer("softmax_top_k", 2, shared_expert_hidden_sizes=(3,),
                   shared_expert_gate=True, hidden_activation="sigmoid")
    plain = _layer("softmax_top_k", 2, hidden_activation="sigmoid")
    plain.gating.gate_kernel.assign(layer.gating.gate_kernel)
    for kernel, other in zip(plain.experts.kernels, layer.experts.kernels):
        kernel.assign(other)
    rng = np.random.default_rng(6)
    layer.shared_expert_gate_kernel.assign(rng.normal(size=(D, 1)))
    x, mask, multiplier = _inputs()
    shared = [k.numpy()[0].astype(np.float64)
              for k in layer.shared_expert.kernels]
    x64 = np.nan_to_num(x).astype(np.float64)
    # Qwen-MoE: sigmoid(x @ w) * shared(x), on every unmasked token,
    # whatever its gate multiplier.
    want = (_sigmoid(x64 @ layer.shared_expert_gate_kernel.numpy())
            * (_sigmoid(x64 @ shared[0]) @ shared[1]) * mask[:, None])
    y = layer(x, mask=mask, gate_multiplier=multiplier)
    routed = plain(x, mask=mask, gate_multiplier=multiplier)
    assert_close(y - routed, want, FORWARD, what="shared expert")
    np.testing.assert_array_equal(y.numpy()[~mask], 0.0)
    assert sorted(w.path.split("/", 1)[1] for w in layer.trainable_weights
                  if "shared" in w.path) == [
        "shared_expert/kernel_0", "shared_expert/kernel_1",
        "shared_expert_gate_kernel"]


# --------------------------------------------------------------------------
# A user's router
# --------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="test_routers")
class _ArgmaxRouter(routers.Router):
    """Top-1 by plain logits, gate 1: a router written by a user."""

    def build(self, input_shape):
        self.kernel = self.add_weight(
            name="kernel", shape=(input_shape[-1], self.num_experts),
            initializer="random_normal", autocast=False)

    def call(self, inputs, training=None, mask=None):
        logits = tf.matmul(tf.cast(inputs, tf.float32), self.kernel)
        index = tf.argmax(logits, 1, output_type=tf.int32)[:, None]
        gates = tf.ones_like(index, tf.float32)
        if mask is not None:
            gates = tf.where(mask[:, None], gates, 0.0)
        probabilities = tf.nn.softmax(logits)
        if mask is not None:
            probabilities = tf.where(mask[:, None], probabilities, 0.0)
        return {"expert_index": index, "expert_gates": gates,
                "probabilities": probabilities}


def test_a_users_router_routes_saves_and_loads(tmp_path):
    router = _ArgmaxRouter(E, k=1, name="argmax")
    inputs = keras.Input((3, D))
    moe = keras_moe.MixtureOfExperts(E, k=1, router=router, name="moe")
    model = keras.Model(inputs, moe(inputs))
    x = np.random.default_rng(7).normal(size=(2, 3, D)).astype("float32")
    y, routing = moe(x, return_routing=True)
    choice = (x.reshape(-1, D) @ router.kernel.numpy()).argmax(1)
    np.testing.assert_array_equal(
        routing["gates"].numpy().reshape(-1, E), np.eye(E)[choice])
    assert moe.gating is router
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    assert isinstance(loaded.get_layer("moe").gating, _ArgmaxRouter)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0),
                                  model.predict(x, verbose=0))


def test_a_router_returning_the_wrong_thing_is_named():
    class Broken(_ArgmaxRouter):
        def call(self, inputs, training=None, mask=None):
            routing = super().call(inputs, training, mask)
            del routing["probabilities"]
            return routing

    moe = keras_moe.MixtureOfExperts(E, k=1, router=Broken(E, k=1))
    with pytest.raises(ValueError, match=r"Broken must return a dict with "
                       r"\['expert_index', 'expert_gates', 'probabilities'\]"):
        moe(np.ones((2, D), "float32"))


# --------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(router="top_k"), ValueError, "router='top_k'"),
    (dict(router=keras.layers.Dense(3)), TypeError, "router=<Dense"),
    (dict(router="softmax_top_k", k=5), ValueError, "k=5"),
    (dict(router="switch"), ValueError, "pass k=1. Received: k=2"),
    (dict(balance_loss="l2"), ValueError, "balance_loss='l2'"),
    (dict(router_z_loss_coef=-1.0), ValueError, "router_z_loss_coef=-1.0"),
    (dict(loss_coef=-0.1), ValueError, "loss_coef=-0.1"),
    (dict(router="softmax_top_k", router_jitter=1.0), ValueError,
     "jitter=1.0"),
    (dict(router_jitter=0.1), ValueError,
     "router_jitter.*own learned noise.*router_jitter=0.1"),
    (dict(router="expert_choice"), ValueError,
     "needs `dispatch=\"capacity\"`. Received: dispatch='sparse'"),
    (dict(normalize_top_k=False), ValueError,
     "normalize_top_k.*router='noisy_top_k' defines.*normalize_top_k=False"),
    (dict(router="switch", k=1, normalize_top_k=False), ValueError,
     "normalize_top_k=False"),
    (dict(router="softmax_top_k", normalize_top_k=1), TypeError,
     "normalize_top_k=1"),
    (dict(router="sigmoid_top_k", noisy_gating=False), ValueError,
     "noisy_gating.*router='sigmoid_top_k'.*noisy_gating=False"),
    (dict(router="softmax_top_k", noise_epsilon=0.1), ValueError,
     "noise_epsilon=0.1"),
    (dict(shared_expert_gate=True), ValueError,
     "shared_expert_hidden_sizes=None"),
    (dict(shared_expert_hidden_sizes=(0,)), ValueError,
     r"shared_expert_hidden_sizes\[0\]"),
    (dict(shared_expert_hidden_sizes=(), glu=True, hidden_sizes=(3,)),
     ValueError, r"glu=True, shared_expert_hidden_sizes=\(\)"),
    (dict(router=routers.SoftmaxTopKRouter(3)), ValueError,
     "router.num_experts=3"),
    (dict(router=routers.SoftmaxTopKRouter(E, k=3)), ValueError,
     r"router's k \(3\).*k=2"),
    (dict(router=routers.SoftmaxTopKRouter(E), seed=1), ValueError,
     "Router layer given as `router`.*seed=1"),
    (dict(router=routers.SoftmaxTopKRouter(E),
          gate_initializer="ones"), ValueError, "gate_initializer="),
])
def test_bad_arguments_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        keras_moe.MixtureOfExperts(E, **kwargs)


def test_noise_is_refused_by_routers_that_draw_none():
    moe = keras_moe.MixtureOfExperts(E, router="softmax_top_k")
    with pytest.raises(ValueError, match="takes none.*noise of shape"):
        moe(np.ones((2, D), "float32"), training=True,
            noise=np.ones((2, E), "float32"))


@pytest.mark.parametrize("cls, kwargs, match", [
    (routers.SoftmaxTopKRouter, dict(jitter=-0.1), "jitter=-0.1"),
    (routers.SigmoidTopKRouter, dict(bias_update_rate=-1.0),
     "bias_update_rate=-1.0"),
    (routers.ExpertChoiceRouter, dict(k=E + 1), f"k={E + 1}"),
])
def test_bad_router_arguments_are_refused(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(E, **kwargs)


# --------------------------------------------------------------------------
# Distribution, expert parallelism, export
# --------------------------------------------------------------------------


def _two_layer_model(strategy=None, dispatch="sparse", expert_parallel=False,
                     first="softmax_top_k"):
    """Two MoE layers: `first` (with a gated SwiGLU shared expert, the
    switch loss and a z-loss), then a sigmoid top-k layer."""
    keras.utils.set_random_seed(3)
    with strategy.scope() if strategy else contextlib.nullcontext():
        common = dict(
            dispatch=dispatch, expert_parallel=expert_parallel,
            capacity_factor=float(E), eval_capacity_factor=float(E),
            gate_initializer=keras.initializers.RandomNormal(seed=1),
            loss_coef=1.0, router_z_loss_coef=0.1)
        extra = (dict(shared_expert_hidden_sizes=(3,),
                      shared_expert_gate=True, glu=True,
                      hidden_activation="silu")
                 if first != "expert_choice" else {})
        model = keras.Sequential([
            keras.Input((D,)),
            keras_moe.MixtureOfExperts(E, k=2, hidden_sizes=(3,),
                                       router=first, name="first",
                                       **extra, **common),
            keras_moe.MixtureOfExperts(E, k=2, hidden_sizes=(3,),
                                       router="sigmoid_top_k",
                                       name="second", **common),
        ])
        optimizer = keras.optimizers.SGD(0.1)
        if expert_parallel:
            optimizer = keras_moe.ExpertParallelOptimizer(optimizer)
        model.compile(optimizer, "mse")
    return model


def _global_batch():
    # Each replica's half from another distribution: per-replica loads
    # differ from the global one.
    rng = np.random.default_rng(8)
    x = rng.normal(size=(16, D)).astype("float32")
    x[8:] += 1.5
    return x, rng.normal(size=(16, D)).astype("float32")


def _named_weights(model):
    # Without the model's name, which differs from model to model; the
    # experts' kernels whole (sharded ones are not `model.weights`).
    weights = {w.path.split("/", 1)[1]: w.numpy() for w in model.weights
               if "/experts/" not in w.path}
    for layer in model.layers:
        for i, kernel in enumerate(layer.experts.kernels):
            weights[f"{layer.name}/experts/kernel_{i}"] = kernel.numpy()
    return weights


def _fit_step(model):
    initial = _named_weights(model)
    x, y = _global_batch()
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    return initial, _named_weights(model)


def test_a_step_on_two_replicas_is_the_step_on_one_device():
    """The switch loss, the z-loss and the bias update read the global
    batch's statistics: one step on 2 replicas moves every weight as one
    step on one device, and the bias as the global load says."""
    initial, single = _fit_step(_two_layer_model())
    _, replicated = _fit_step(_two_layer_model(mirrored(2)))
    bias = "second/gating/expert_bias"
    assert np.any(single[bias] != 0)
    for path, want in single.items():
        if path == bias:
            # u * sign(...) exactly.
            np.testing.assert_array_equal(replicated[path], want)
        else:
            assert_close(replicated[path] - initial[path],
                         want - initial[path], STEP, what=path)
    # The first replica's load alone would have moved it otherwise.
    local = _two_layer_model()
    x, _ = _global_batch()
    local.get_layer("second")(local.get_layer("first")(x[:8]),
                              training=True)
    assert np.any(local.get_layer("second").gating.expert_bias.numpy()
                  != single[bias])


def test_expert_parallel_trains_as_the_replicated_layer():
    # Expert choice, then sigmoid top-k, with sharded experts.
    strategy = mirrored(2)
    want = _fit_step(_two_layer_model(strategy, "capacity",
                                      first="expert_choice"))
    got = _fit_step(_two_layer_model(strategy, "capacity", True,
                                     "expert_choice"))
    initial = want[0]
    assert want[1].keys() == got[1].keys()
    for path, value in want[1].items():
        if "gate_kernel" in path or "experts" in path:
            assert np.abs(value - initial[path]).max() > 1e-4, path
        assert_close(got[1][path] - initial[path], value - initial[path],
                     STEP, what=path)


def test_export_serves_what_predict_gives(tmp_path):
    model = _two_layer_model(dispatch="capacity", first="expert_choice")
    _fit_step(model)
    x, _ = _global_batch()
    export_dir = str(tmp_path / "exported")
    model.export(export_dir, verbose=False)
    served = tf.saved_model.load(export_dir)
    assert_close(served.serve(x).numpy(), model.predict(x, verbose=0),
                 FORWARD, what="serve")
    # The bias was saved with the model.
    bias = model.get_layer("second").gating.expert_bias.numpy()
    assert np.any(bias != 0)
    assert any(np.array_equal(v.numpy(), bias) for v in served.variables)
