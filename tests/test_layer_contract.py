"""Every keras_moe layer passes `layer_test_case.run_layer_test`: build,
symbolic call, config and `.keras` round trips, a `fit` step and mixed
precision (tests/layer_test_case.py says what each check asserts).

Each case sets most arguments away from their defaults, so that a config
that loses one gives another layer."""

import pathlib
import re

import keras
import numpy as np
import pytest

import keras_moe
from keras_moe.secondary_gating import SecondaryGating
from layer_test_case import LayerCase, Spec, run_layer_test

_rng = np.random.default_rng(0)


def _normal(*shape):
    return _rng.normal(size=shape).astype("float32")


def _routing(num_experts, batch_shape, statistics_shape, drops=False):
    """The `return_routing=True` dict of the MoE layers."""
    routing = {
        "gates": Spec(batch_shape + (num_experts,), "float32"),
        "importance": Spec(statistics_shape, "float32"),
        "load": Spec(statistics_shape, "float32"),
        "aux_loss": Spec((), "float32"),
        "part_sizes": Spec((num_experts,), "int32"),
        "expert_index": Spec((None,), "int32"),
        "token_index": Spec((None,), "int64"),
        "expert_gates": Spec((None,), "float32"),
    }
    if drops:
        routing["dropped_fraction"] = Spec((), "float32")
    return routing


def _moe_metrics(name, drops=False,
                 keys=("aux_loss", "importance_cv2", "load_cv2",
                       "max_overload")):
    keys = list(keys)
    return tuple(f"{name}_{key}"
                 for key in keys + (["dropped_fraction"] if drops else []))


def _token_choice(num_experts, k):
    """The routing dict of a token-choice router."""
    return {
        "expert_index": Spec((None, k), "int32"),
        "expert_gates": Spec((None, k), "float32"),
        "probabilities": Spec((None, num_experts), "float32"),
        "logits": Spec((None, num_experts), "float32"),
    }


CASES = [
    LayerCase(
        id="moe_sparse",
        cls=keras_moe.MixtureOfExperts,
        init_kwargs=dict(
            num_experts=4, k=2, output_dim=3, hidden_sizes=(6,),
            hidden_activation="gelu", autoscale=False, noise_epsilon=0.05,
            loss_coef=0.1,
            gate_initializer=keras.initializers.RandomNormal(stddev=0.5,
                                                             seed=1),
            expert_initializer=keras.initializers.HeNormal(seed=2), seed=7,
            cross_replica_balance=False, name="moe",
        ),
        inputs={"inputs": _normal(7, 5, 6)},
        call_kwargs=dict(return_routing=True),
        outputs=(Spec((None, 5, 3)), _routing(4, (None, 5), (4,))),
        # Gate and noise kernels, the experts' two; last_importance and
        # last_load.
        num_trainable_weights=4, num_non_trainable_weights=2, num_losses=1,
        metrics=_moe_metrics("moe"),
        supports_jit=False, mixed_policy="mixed_float16",
    ),
    LayerCase(
        id="moe_capacity",
        cls=keras_moe.MixtureOfExperts,
        init_kwargs=dict(
            num_experts=5, k=3, hidden_sizes=(7, 5),
            hidden_activation="tanh", gate_initializer="random_normal",
            dispatch="capacity",
            capacity_factor=1.0, eval_capacity_factor=1.5, min_capacity=2,
            name="moe",
        ),
        inputs={"inputs": _normal(6, 4, 8)},
        call_kwargs=dict(return_routing=True),
        outputs=(Spec((None, 4, 8)),
                 _routing(5, (None, 4), (5,), drops=True)),
        # Noisy gating under XLA too: gate and noise kernels, the experts'
        # three.
        num_trainable_weights=5, num_non_trainable_weights=2, num_losses=1,
        metrics=_moe_metrics("moe", drops=True),
        supports_jit=True, mixed_policy="mixed_bfloat16",
    ),
    LayerCase(
        id="hierarchical_moe",
        cls=keras_moe.HierarchicalMixtureOfExperts,
        init_kwargs=dict(
            # Without noise a gate gets a gradient only from a choice of
            # two at least (one gate of 1 is a constant): k, group_k >= 2.
            num_groups=3, experts_per_group=3, k=2, group_k=2, output_dim=4,
            hidden_sizes=(5,), noisy_gating=False, loss_coef=0.05,
            gate_initializer=keras.initializers.RandomNormal(seed=3),
            seed=4, routing_metrics=False, name="hmoe",
        ),
        # The primary gate reads `gating_inputs`, the rest `inputs`.
        inputs={"inputs": _normal(3, 4, 6), "gating_inputs": _normal(3, 4, 2)},
        outputs=Spec((None, 4, 4)),
        # Primary and secondary gates (no noise kernels), the experts' two.
        num_trainable_weights=4, num_non_trainable_weights=2, num_losses=1,
        supports_jit=False, mixed_policy="mixed_bfloat16",
    ),
    LayerCase(
        # Mixtral/Qwen-MoE-like: softmax top-k, SwiGLU experts, the switch
        # loss, a z-loss, jitter and a gated shared expert.
        id="moe_softmax_top_k_shared_expert",
        cls=keras_moe.MixtureOfExperts,
        init_kwargs=dict(
            num_experts=4, k=2, hidden_sizes=(5,), hidden_activation="silu",
            glu=True, autoscale=False,
            router="softmax_top_k", normalize_top_k=False,
            balance_loss="switch", router_z_loss_coef=1e-3,
            router_jitter=0.1, shared_expert_hidden_sizes=(3,),
            shared_expert_gate=True, seed=3,
            gate_initializer=keras.initializers.RandomNormal(seed=4),
            name="moe",
        ),
        inputs={"inputs": _normal(5, 3, 6)},
        call_kwargs=dict(return_routing=True),
        outputs=(Spec((None, 3, 6)), _routing(4, (None, 3), (4,))),
        # Gate kernel, the experts' two, the shared expert's two and its
        # gate; last_importance and last_load.
        num_trainable_weights=6, num_non_trainable_weights=2, num_losses=1,
        metrics=_moe_metrics("moe", keys=("aux_loss", "switch_loss",
                                          "load_cv2", "max_overload",
                                          "z_loss")),
        supports_jit=False, mixed_policy="mixed_float16",
    ),
    LayerCase(
        # DeepSeek-V3-like, under XLA: sigmoid top-k with its bias.
        id="moe_sigmoid_top_k_capacity",
        cls=keras_moe.MixtureOfExperts,
        init_kwargs=dict(
            num_experts=4, k=2, hidden_sizes=(5,), router="sigmoid_top_k",
            balance_loss="cv_squared", dispatch="capacity",
            capacity_factor=1.5, gate_initializer="random_normal",
            name="moe",
        ),
        inputs={"inputs": _normal(6, 5)},
        outputs=Spec((None, 5)),
        # Gate kernel and the experts' two; last_importance, last_load
        # and the expert bias.
        num_trainable_weights=3, num_non_trainable_weights=3, num_losses=1,
        metrics=_moe_metrics("moe", drops=True) + ("moe_bias_spread",),
        supports_jit=True, mixed_policy="mixed_bfloat16",
    ),
    LayerCase(
        id="moe_expert_choice",
        cls=keras_moe.MixtureOfExperts,
        init_kwargs=dict(
            num_experts=3, k=2, output_dim=2, router="expert_choice",
            dispatch="capacity", capacity_factor=0.5, min_capacity=1,
            router_z_loss_coef=0.01, gate_initializer="random_normal",
            name="moe",
        ),
        inputs={"inputs": _normal(4, 3, 5)},
        call_kwargs=dict(return_routing=True),
        outputs=(Spec((None, 3, 2)),
                 _routing(3, (None, 3), (3,), drops=True)),
        num_trainable_weights=2, num_non_trainable_weights=2, num_losses=1,
        metrics=_moe_metrics("moe", drops=True,
                             keys=("aux_loss", "load_cv2", "max_overload",
                                   "z_loss")),
        supports_jit=True, mixed_policy="mixed_float16",
    ),
    LayerCase(
        id="softmax_top_k_router",
        cls=keras_moe.routers.SoftmaxTopKRouter,
        init_kwargs=dict(
            num_experts=5, k=3, normalize_top_k=False, jitter=0.2,
            kernel_initializer=keras.initializers.RandomNormal(seed=3),
            seed=6,
        ),
        inputs={"inputs": _normal(7, 4)},
        outputs=_token_choice(5, 3),
        num_trainable_weights=1,
        supports_jit=True, mixed_policy="mixed_float16",
    ),
    LayerCase(
        id="sigmoid_top_k_router",
        cls=keras_moe.routers.SigmoidTopKRouter,
        init_kwargs=dict(
            num_experts=4, k=1, normalize_top_k=False, bias_update_rate=0.01,
            jitter=0.1, kernel_initializer="random_normal", seed=2,
        ),
        inputs={"inputs": _normal(6, 3)},
        outputs=_token_choice(4, 1),
        # The gate kernel; the expert bias.
        num_trainable_weights=1, num_non_trainable_weights=1,
        supports_jit=True, mixed_policy="mixed_bfloat16",
    ),
    LayerCase(
        id="expert_choice_router",
        cls=keras_moe.routers.ExpertChoiceRouter,
        init_kwargs=dict(
            num_experts=3, k=2, jitter=0.05,
            kernel_initializer="random_normal", seed=1,
        ),
        inputs={"inputs": _normal(5, 4)},
        call_kwargs=dict(capacity=2),
        outputs={
            "token_index": Spec((3, 2), "int32"),
            "token_gates": Spec((3, 2), "float32"),
            "probabilities": Spec((None, 3), "float32"),
            "logits": Spec((None, 3), "float32"),
        },
        num_trainable_weights=1,
        supports_jit=True, mixed_policy="mixed_float16",
    ),
    LayerCase(
        id="noisy_top_k_gating",
        cls=keras_moe.NoisyTopKGating,
        init_kwargs=dict(
            num_experts=5, k=3, noise_epsilon=0.1,
            kernel_initializer=keras.initializers.TruncatedNormal(seed=3),
            seed=11,
        ),
        inputs={"inputs": _normal(9, 6)},
        # (gates, load): float32 under every policy.
        outputs=(Spec((None, 5), "float32"), Spec((5,), "float32")),
        num_trainable_weights=2,
        supports_jit=True, mixed_policy="mixed_float16",
    ),
    LayerCase(
        id="secondary_gating",
        cls=SecondaryGating,
        init_kwargs=dict(
            num_groups=3, experts_per_group=4, k=1, noise_epsilon=0.05,
            kernel_initializer=keras.initializers.RandomNormal(seed=3),
            seed=5,
        ),
        inputs={"inputs": _normal(7, 5),
                "group_sizes": np.array([4, 0, 3], "int32")},
        unbatched=("group_sizes",),
        # (gates, row_load).
        outputs=(Spec((None, 4), "float32"), Spec((None, 4), "float32")),
        num_trainable_weights=2,
        supports_jit=True, mixed_policy="mixed_bfloat16",
    ),
    LayerCase(
        id="feed_forward_experts",
        cls=keras_moe.FeedForwardExperts,
        init_kwargs=dict(
            num_experts=3, output_dim=2, hidden_sizes=(6,),
            hidden_activation="sigmoid", autoscale=False,
            kernel_initializer=keras.initializers.Orthogonal(seed=4),
        ),
        inputs={"inputs": _normal(10, 5),
                "part_sizes": np.array([4, 1, 5], "int32")},
        unbatched=("part_sizes",),
        outputs=Spec((None, 2)),
        num_trainable_weights=2,
        supports_jit=True, mixed_policy="mixed_float16",
    ),
    LayerCase(
        id="sharded_embedding",
        cls=keras_moe.ShardedEmbedding,
        init_kwargs=dict(
            input_dim=11, output_dim=4, num_shards=3,
            embeddings_initializer=keras.initializers.RandomNormal(seed=5),
            embeddings_regularizer="l2",
        ),
        # Every id once at least: one step moves every shard.
        inputs={"inputs": np.arange(12, dtype="int32").reshape(3, 4) % 11},
        outputs=Spec((None, 4, 4)),
        # The regularizer's term of each shard.
        num_trainable_weights=3, num_losses=3,
        supports_jit=False, mixed_policy="mixed_float16",
    ),
    LayerCase(
        id="sampled_softmax_loss",
        cls=keras_moe.SampledSoftmaxLoss,
        init_kwargs=dict(
            num_classes=12, num_sampled=4, num_shards=2, sampler="uniform",
            unique=False, seed=3,
            embeddings_initializer=keras.initializers.RandomNormal(seed=2),
        ),
        inputs={"features": _normal(6, 5),
                "target_classes": np.array([0, 3, 11, 6, 1, 6], "int32")},
        # The per-example loss, float32 under every policy.
        outputs=Spec((None,), "float32"),
        num_trainable_weights=2,
        supports_jit=False, mixed_policy="mixed_bfloat16",
    ),
]


def test_every_layer_has_a_case():
    # The public ones, and every layer keras_moe registers for loading.
    layers = {
        obj for obj in [*vars(keras_moe).values(),
                        *keras.saving.get_custom_objects().values()]
        if isinstance(obj, type) and issubclass(obj, keras.layers.Layer)
        and obj.__module__.startswith("keras_moe")
        # keras-hub's classes underneath (their calls return keras-hub's
        # tuples): tests/test_keras_hub.py tests them against keras-hub.
        and not obj.__module__.startswith("keras_moe.integrations")
    }
    assert SecondaryGating in layers
    missing = layers - {case.cls for case in CASES}
    assert not missing, sorted(cls.__name__ for cls in missing)


def test_no_test_imports_private_keras():
    # Keras's `src` package is private: a Keras upgrade may move anything
    # in it. The tests use the public API (layer_test_case.py for the
    # checks Keras's own TestCase makes).
    private = re.compile(r"^\s*(from|import)\s+keras\.src\b", re.M)
    found = [
        f"{path.relative_to(pathlib.Path(__file__).parent)}:"
        f"{text.count(chr(10), 0, match.start()) + 1}"
        for path in sorted(pathlib.Path(__file__).parent.rglob("*.py"))
        for text in [path.read_text()]
        for match in private.finditer(text)
    ]
    assert not found, found


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_layer(case, tmp_path):
    run_layer_test(case, tmp_path)


def _case(case_id):
    return next(case for case in CASES if case.id == case_id)


def _dropping(cls, key):
    get_config = cls.get_config

    def without_key(self):
        config = get_config(self)
        del config[key]
        return config

    return without_key


def _ignoring(cls, key):
    init = cls.__init__

    def ignores(self, *args, **kwargs):
        kwargs.pop(key)
        init(self, *args, **kwargs)

    return ignores


@pytest.mark.parametrize("case_id, cls, name, broken, message", [
    pytest.param("moe_sparse", keras_moe.MixtureOfExperts, "get_config",
                 _dropping(keras_moe.MixtureOfExperts, "hidden_activation"),
                 r"get_config\(\) lacks .*\['hidden_activation'\]",
                 id="config_without_an_argument"),
    pytest.param("noisy_top_k_gating", keras_moe.NoisyTopKGating,
                 "__init__",
                 _ignoring(keras_moe.NoisyTopKGating, "noise_epsilon"),
                 "given noise_epsilon=0.1, its config says 0.01",
                 id="ignored_argument"),
    pytest.param("feed_forward_experts", keras_moe.FeedForwardExperts,
                 "compute_output_shape", lambda self, shape: tuple(shape),
                 r"symbolic call: output \(\) has shape \(None, 5\), "
                 r"expected \(None, 2\)",
                 id="wrong_symbolic_shape"),
])
def test_the_helper_catches(case_id, cls, name, broken, message,
                            monkeypatch, tmp_path):
    # The checks fail on a broken layer (more breakages, each caught, were
    # tried by hand: a lost metric, loss, weight update or XLA support, a
    # lossy initializer, wrong dtypes under mixed precision, weights not
    # loaded from a .keras file).
    monkeypatch.setattr(cls, name, broken)
    with pytest.raises(AssertionError, match=message):
        run_layer_test(_case(case_id), tmp_path)
