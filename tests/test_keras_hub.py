"""keras_moe.integrations.keras_hub.sparsify: keras-hub's Mixtral, Qwen-MoE
and Qwen3-MoE models with their MoE blocks run by keras_moe.

Each test builds small randomly initialized keras-hub models (nothing
downloads) and compares the sparsified model with the keras-hub model it
came from, the same weights: outputs with a padding mask, the balancing
loss, gradients, `generate`'s tokens, weight files both ways, `.keras` and
preset round trips; and shows that only the selected experts run.
Skipped without keras-hub (the `test` extra installs it).
"""

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

keras_hub = pytest.importorskip("keras_hub")

from keras_moe.integrations import keras_hub as moe_hub  # noqa: E402
from numerics import FORWARD, GRADIENT, assert_close  # noqa: E402

SIZES = dict(vocabulary_size=64, num_layers=2, num_query_heads=2,
             num_key_value_heads=1, hidden_dim=16, intermediate_dim=32,
             num_experts=4, top_k=2)

# name: (backbone class, causal LM class, arguments, the decoder's block
# attribute, the sparse backbone and block classes).
FAMILIES = {
    "mixtral": (
        keras_hub.models.MixtralBackbone, keras_hub.models.MixtralCausalLM,
        dict(SIZES), "_sparse_moe_block", moe_hub.SparseMixtralBackbone,
        moe_hub.SparseMixtralMoeBlock,
    ),
    # keras-hub's default: the top k not renormalized.
    "qwen_moe": (
        keras_hub.models.QwenMoeBackbone, keras_hub.models.QwenMoeCausalLM,
        dict(SIZES, moe_intermediate_dim=8, shared_expert_intermediate_dim=24),
        "mlp", moe_hub.SparseQwenMoeBackbone, moe_hub.SparseQwenMoeBlock,
    ),
    # The second layer a dense feed-forward network (`mlp_only_layers`),
    # which stays.
    "qwen3_moe": (
        keras_hub.models.Qwen3MoeBackbone, keras_hub.models.Qwen3MoeCausalLM,
        dict(SIZES, moe_intermediate_dim=8, head_dim=8, norm_top_k_prob=True,
             mlp_only_layers=[1]),
        "mlp", moe_hub.SparseQwen3MoeBackbone, moe_hub.SparseQwen3MoeBlock,
    ),
}

# Two sequences, the second padded (right, as keras-hub's preprocessors pad).
TOKEN_IDS = np.array([[5, 17, 33, 2, 60, 9], [41, 8, 8, 30, 0, 0]], "int32")
PADDING_MASK = (TOKEN_IDS > 0).astype("int32")
INPUTS = {"token_ids": TOKEN_IDS, "padding_mask": PADDING_MASK}


@pytest.fixture(params=list(FAMILIES), scope="module")
def family(request):
    return request.param


def _dense_backbone(family, **overrides):
    """A randomly initialized keras-hub backbone of `family`, its router
    kernels drawn so that the router logits have a standard deviation near
    1 (Qwen's initializer gives near-ties, all probabilities close to
    1 / num_experts)."""
    backbone_class, _, arguments, attribute, _, _ = FAMILIES[family]
    keras.utils.set_random_seed(7)
    backbone = backbone_class(**dict(arguments, **overrides))
    rng = np.random.default_rng(7)
    for decoder in backbone.transformer_layers:
        block = getattr(decoder, attribute)
        if hasattr(block, "_sparse_feedforward_gate_dense"):
            kernel = block._sparse_feedforward_gate_dense.kernel
            kernel.assign(rng.normal(size=kernel.shape) / np.sqrt(
                kernel.shape[0]))
    return backbone


def _copy(backbone):
    """A keras-hub backbone of the same class, config and weights."""
    copy = type(backbone).from_config(backbone.get_config())
    copy.set_weights(backbone.get_weights())
    return copy


def _blocks(backbone, family):
    attribute = FAMILIES[family][3]
    return [getattr(decoder, attribute)
            for decoder in backbone.transformer_layers]


def _weight_file(model, path):
    """`{path in the file: array}` of `model.save_weights(path)`."""
    model.save_weights(path)
    arrays = {}
    with h5py.File(path, "r") as file:
        file.visititems(lambda name, item: arrays.__setitem__(name, item[()])
                        if isinstance(item, h5py.Dataset) else None)
    return arrays


def _moe_token_mask(family):
    """Which tokens the MoE blocks route: Mixtral's the unpadded ones;
    keras-hub's Qwen blocks count a token when it attends to any key, and
    right-padded tokens attend to the unpadded ones before them."""
    if family == "mixtral":
        return PADDING_MASK.astype(bool)
    return np.ones(PADDING_MASK.shape, bool)


def test_sparsify_converts_in_place(family):
    dense = _dense_backbone(family)
    num_params = dense.count_params()
    dense_blocks = _blocks(dense, family)
    backbone = _copy(dense)
    _, _, _, _, sparse_backbone, sparse_block = FAMILIES[family]
    assert moe_hub.sparsify(backbone) is backbone
    assert type(backbone) is sparse_backbone
    blocks = _blocks(backbone, family)
    for dense_block, block in zip(dense_blocks, blocks):
        if isinstance(dense_block, sparse_block._HUB_BLOCK):
            # Still a keras-hub block for keras-hub's decoders' checks.
            assert type(block) is sparse_block
            assert isinstance(block, type(dense_block))
        else:  # a dense feed-forward layer stays as it is
            assert type(block) is type(dense_block)
    # Qwen3-MoE's second layer is a dense feed-forward network.
    assert sum(type(block) is sparse_block for block in blocks) == (
        1 if family == "qwen3_moe" else 2)
    # keras-hub's parameters, not one more (keras_moe's routing statistics
    # are no weights of the block).
    assert backbone.count_params() == num_params
    # A second call changes nothing.
    moe_hub.sparsify(backbone)
    assert _blocks(backbone, family) == blocks


def test_outputs_equal_keras_hub(family):
    dense = _dense_backbone(family)
    backbone = moe_hub.sparsify(_copy(dense))
    expected = keras.ops.convert_to_numpy(dense(INPUTS))
    outputs = keras.ops.convert_to_numpy(backbone(INPUTS))
    routed = _moe_token_mask(family)
    assert_close(outputs[routed], expected[routed], FORWARD,
                 what=f"{family} outputs")
    if not routed.all():
        # Padded tokens reach no expert; keras-hub's values there are
        # unused (no unpadded token attends to them).
        assert not np.allclose(outputs[~routed], expected[~routed])


def test_same_balancing_loss(family):
    dense = _dense_backbone(family)
    backbone = moe_hub.sparsify(_copy(dense))
    dense(INPUTS, training=True)
    expected = [float(loss) for loss in dense.losses]
    backbone(INPUTS, training=True)
    losses = [float(loss) for loss in backbone.losses]
    assert len(losses) == len(expected) >= 1
    assert_close(losses, expected, FORWARD, what=f"{family} losses")
    # In inference keras-hub adds none; the sparse blocks add zeros.
    dense(INPUTS)
    backbone(INPUTS)
    assert dense.losses == []
    assert [float(loss) for loss in backbone.losses] == [0.0] * len(losses)


def test_only_the_selected_experts_run(family, monkeypatch):
    backbone = moe_hub.sparsify(_dense_backbone(family))
    rows = []
    for block in _blocks(backbone, family):
        if not isinstance(block, FAMILIES[family][5]):
            continue
        experts = block.moe.experts
        call = experts.call

        def counting_call(inputs, *args, _call=call, **kwargs):
            rows.append(int(inputs.shape[0]))
            return _call(inputs, *args, **kwargs)

        monkeypatch.setattr(experts, "call", counting_call)
    backbone(INPUTS)
    # keras-hub's blocks run all num_experts experts on every token; here
    # each routed token reaches its top_k experts, one row each.
    routed_rows = int(_moe_token_mask(family).sum()) * SIZES["top_k"]
    assert rows and rows == [routed_rows] * len(rows)
    assert routed_rows < TOKEN_IDS.size * SIZES["num_experts"]


def _gradients(backbone, path):
    """Gradients of a next-token loss plus the balancing loss, in training,
    with respect to the weights, as `{path in a weight file: array}`."""
    targets = np.roll(TOKEN_IDS, -1, axis=1)
    with tf.GradientTape() as tape:
        hidden = backbone(INPUTS, training=True)
        logits = backbone.token_embedding(hidden, reverse=True)
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(
            targets, logits, sample_weight=PADDING_MASK)
        loss += sum(backbone.losses)
    gradients = tape.gradient(loss, backbone.trainable_weights)
    # Kept in the variables' place, to read in keras-hub's layout.
    saved = [weight.numpy() for weight in backbone.trainable_weights]
    for weight, gradient in zip(backbone.trainable_weights, gradients):
        weight.assign(gradient)
    arrays = _weight_file(backbone, path)
    for weight, value in zip(backbone.trainable_weights, saved):
        weight.assign(value)
    return arrays


def test_same_gradients(family, tmp_path):
    path = tmp_path / "gradients.weights.h5"
    dense = _dense_backbone(family)
    backbone = moe_hub.sparsify(_copy(dense))
    expected = _gradients(dense, path)
    gradients = _gradients(backbone, path)
    assert sorted(gradients) == sorted(expected)
    for path, value in expected.items():
        assert_close(gradients[path], value, GRADIENT, what=path)


def test_generate_gives_the_same_tokens(family):
    _, causal_lm_class, _, _, _, _ = FAMILIES[family]
    dense = _dense_backbone(family)
    dense_lm = causal_lm_class(backbone=dense, preprocessor=None)
    lm = moe_hub.sparsify(causal_lm_class(backbone=_copy(dense),
                                          preprocessor=None))
    # keras-hub compiled the task; XLA is off now (on a GPU it was on).
    assert lm.jit_compile is False
    prompt = {"token_ids": np.array([[5, 17, 3, 0, 0, 0, 0, 0],
                                     [41, 0, 0, 0, 0, 0, 0, 0]], "int32")}
    prompt["padding_mask"] = (prompt["token_ids"] > 0).astype("int32")
    # The reference eagerly (quicker than tracing it); the sparse model in
    # keras-hub's compiled generation loop, with its cache.
    dense_lm.compile(sampler="greedy", run_eagerly=True)
    lm.compile(sampler="greedy")
    expected = dense_lm.generate(prompt, stop_token_ids=None)
    generated = lm.generate(prompt, stop_token_ids=None)
    np.testing.assert_array_equal(generated["token_ids"],
                                  expected["token_ids"])
    assert (generated["token_ids"][:, 3:] > 0).all()


def test_fit_trains():
    # One family: `test_same_gradients` compares every family's gradients
    # with keras-hub's; this is `fit`'s compiled training step, on
    # Qwen-MoE's shared expert and dense layer too.
    family = "qwen_moe"
    lm = moe_hub.sparsify(FAMILIES[family][1](
        backbone=_dense_backbone(family), preprocessor=None))
    lm.compile(optimizer=keras.optimizers.SGD(0.1))
    before = {id(weight): weight.numpy() for weight in lm.trainable_weights}
    history = lm.fit(
        INPUTS, np.roll(TOKEN_IDS, -1, axis=1), sample_weight=PADDING_MASK,
        batch_size=2, epochs=2, shuffle=False, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert history.history["loss"][1] < history.history["loss"][0]
    block = _blocks(lm.backbone, family)[0]
    for weight in (block.moe.gating.gate_kernel, *block.moe.experts.kernels,
                   block.moe.shared_expert_gate_kernel):
        assert not np.array_equal(weight.numpy(), before[id(weight)]), (
            weight.path)


def test_weight_files_keep_keras_hubs_layout(family, tmp_path):
    dense = _dense_backbone(family)
    expected = keras.ops.convert_to_numpy(dense(INPUTS))
    dense_file = _weight_file(dense, tmp_path / "dense.weights.h5")
    backbone = moe_hub.sparsify(_copy(dense))
    sparse_file = _weight_file(backbone, tmp_path / "sparse.weights.h5")
    assert sorted(sparse_file) == sorted(dense_file)
    for path, value in dense_file.items():
        np.testing.assert_array_equal(sparse_file[path], value, err_msg=path)
    routed = _moe_token_mask(family)
    # A keras-hub file loads into a sparse model ...
    other = moe_hub.sparsify(_dense_backbone(family))
    other.load_weights(tmp_path / "dense.weights.h5")
    assert_close(keras.ops.convert_to_numpy(other(INPUTS))[routed],
                 expected[routed], FORWARD, what="keras-hub file loaded")
    # ... and a sparse model's into keras-hub's.
    fresh = FAMILIES[family][0](**FAMILIES[family][2])
    fresh.load_weights(tmp_path / "sparse.weights.h5")
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(fresh(INPUTS)), expected)


def test_keras_file_and_preset_load_sparse(family, tmp_path):
    _, causal_lm_class, _, _, sparse_backbone, sparse_block = FAMILIES[family]
    lm = moe_hub.sparsify(causal_lm_class(
        backbone=_dense_backbone(family), preprocessor=None))
    expected = keras.ops.convert_to_numpy(lm(INPUTS))
    lm.save(tmp_path / "lm.keras")
    loaded = keras.saving.load_model(tmp_path / "lm.keras")
    assert type(loaded.backbone) is sparse_backbone
    assert sparse_block in {type(b) for b in _blocks(loaded.backbone,
                                                       family)}
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(loaded(INPUTS)), expected)
    if family != "qwen3_moe":
        return  # one preset round trip is enough
    lm.backbone.save_to_preset(str(tmp_path / "preset"))
    backbone = keras_hub.models.Backbone.from_preset(str(tmp_path / "preset"))
    assert type(backbone) is sparse_backbone
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(backbone(INPUTS)),
        keras.ops.convert_to_numpy(lm.backbone(INPUTS)))


def test_router_logits_and_jitter():
    """The block-level extras: router logits for decoders that return
    them, and Mixtral's jitter of the block's input while training."""
    dense = _dense_backbone("mixtral", router_jitter_noise=0.5)
    dense_block = dense.transformer_layers[0]._sparse_moe_block
    backbone = moe_hub.sparsify(_copy(dense))
    block = backbone.transformer_layers[0]._sparse_moe_block
    assert block.router_jitter_noise == 0.5
    x = np.random.default_rng(0).normal(size=(2, 3, 16)).astype("float32")
    expected, expected_logits = dense_block(x)
    outputs, logits = block(x)
    assert logits is None
    assert_close(outputs, expected, FORWARD, what="block outputs")
    block.return_router_logits = True
    _, logits = block(x)
    assert_close(logits, expected_logits, FORWARD, what="router logits")
    # Jittered while training: other outputs each call.
    first, _ = block(x, training=True)
    second, _ = block(x, training=True)
    assert not np.allclose(first, expected)
    assert not np.allclose(first, second)


@pytest.mark.parametrize("model", [
    keras.Sequential([keras.layers.Dense(2)]),
    "mixtral",
    None,
])
def test_rejects_other_models(model):
    with pytest.raises(ValueError, match=r"`model` must be a keras-hub .*"
                       r"Received: model="):
        moe_hub.sparsify(model)


def test_says_what_is_missing_without_keras_hub(monkeypatch):
    # What an environment without keras-hub (or with one that moved the
    # block classes) gets: the module imports, sparsify says why it cannot.
    monkeypatch.setattr(moe_hub, "keras_hub", None)
    monkeypatch.setattr(moe_hub, "_IMPORT_ERROR",
                        ImportError("No module named 'keras_hub'"))
    with pytest.raises(ImportError, match=r"keras_moe\[keras_hub\].*"
                       r"No module named 'keras_hub'"):
        moe_hub.sparsify(_dense_backbone("qwen3_moe"))
