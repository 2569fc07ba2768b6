"""`run_layer_test`: the checks every keras_moe layer passes, in one call.

The checks of Keras's (and keras-hub's) `TestCase.run_layer_test`, for
layers that helper cannot take: shapes that depend on the data (no XLA,
except the capacity dispatch), tensor arguments besides the first
(`part_sizes`, `group_sizes`, `gating_inputs`, `target_classes`), tuple
and dict outputs (the gatings, `return_routing=True`), integer inputs.
Public Keras APIs only (none of Keras's private `src` package; the test
suite holds no import of it, tests/test_layer_contract.py checks): a Keras
upgrade that changes one fails a check here by name, not an import.

For one `LayerCase`, in this order (each failure names the case and the
check):

1. config: every constructor argument is in `get_config()`, each one the
   case gives with the value given; the config survives JSON;
   `from_config` gives back the same config and refuses an unknown key;
   `serialize_keras_object` names the registered class, and
   `deserialize_keras_object(..., safe_mode=True)` gives it back.
2. build: `layer.build(shapes)` builds the weights (how many, which shapes)
   that calling the layer builds; rebuilt from its config under the same
   seed, the layer starts from the same weights (its initializers survive
   the config).
3. symbolic call: on `keras.Input`s (batch `None`; `unbatched` inputs at
   their own shape) the outputs have the expected structure, shapes and
   dtypes; a functional model of that call gives the layer's eager
   outputs, which have those shapes and dtypes too, and the expected number
   of `add_loss` terms.
4. `.keras` round trip: the model, saved and loaded with `safe_mode=True`,
   holds a layer of the class with the same config and gives equal
   outputs (random weights, so that nothing is equal by accident), and
   the same number of losses.
5. training step: `compile(jit_compile=True)` compiles with XLA exactly
   when the layer says it supports it (`supports_jit`); one `fit` step on
   the sum of squares of its float outputs (and its `add_loss` terms)
   gives a finite loss, moves every trainable weight and logs the layer's
   own metrics.
6. mixed precision: under `mixed_policy` (`dtype=` argument), eager calls
   in inference and training and the symbolic call give the expected
   output dtypes ("compute": the policy's compute dtype, else a fixed
   dtype) and finite outputs; every float variable and every loss is
   float32.
"""

import dataclasses
import inspect
import json
import os
import warnings
from typing import Any

import keras
import numpy as np
import tensorflow as tf

#: In `Spec.dtype`: the layer's compute dtype (float32, or the mixed
#: policy's float16 / bfloat16).
COMPUTE = "compute"


class Spec:
    """An expected output: its shape (`None` for an axis of any size in the
    eager outputs, and `None` in the symbolic ones) and dtype (a dtype name
    or `COMPUTE`). A leaf to `keras.tree`, unlike a tuple."""

    def __init__(self, shape, dtype=COMPUTE):
        self.shape = tuple(shape)
        self.dtype = dtype

    def __repr__(self):
        return f"Spec({self.shape}, {self.dtype!r})"


@dataclasses.dataclass
class LayerCase:
    """One layer and what to expect of it.

    `inputs` maps each tensor argument of `call` to its value: the first is
    passed by position, the others by name. `unbatched` names those whose
    first axis is not the batch (`part_sizes [num_experts]`): their
    `keras.Input` has their whole static shape. `call_kwargs` are the other
    (Python) arguments of every call. `outputs` is the structure of `Spec`s
    a call returns.
    """

    id: str
    cls: type
    init_kwargs: dict
    inputs: dict
    outputs: Any
    mixed_policy: str
    supports_jit: bool
    num_trainable_weights: int
    num_non_trainable_weights: int = 0
    num_losses: int = 0
    metrics: tuple = ()
    unbatched: tuple = ()
    call_kwargs: dict = dataclasses.field(default_factory=dict)
    seed: int = 0

    def __str__(self):
        return self.id


def run_layer_test(case, tmp_path):
    """Runs every check on `case` (a `LayerCase`), in the order above;
    `tmp_path` is a folder for the `.keras` file."""
    _check_config(case)
    _check_build(case)
    model, layer, eager = _check_symbolic_and_eager_calls(case)
    _check_keras_file(case, model, layer, eager, tmp_path)
    _check_training_step(case, model, layer)
    _check_mixed_precision(case)


# --------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------


def _check_config(case):
    layer = case.cls(**case.init_kwargs)
    config = layer.get_config()
    arguments = [
        name for name, p in inspect.signature(case.cls.__init__).parameters
        .items() if name != "self" and p.kind not in (p.VAR_POSITIONAL,
                                                      p.VAR_KEYWORD)
    ]
    missing = [name for name in arguments if name not in config]
    assert not missing, (
        f"{case}: get_config() lacks the constructor arguments {missing}: a "
        f"layer from its config would take their defaults")
    for name, value in case.init_kwargs.items():
        want = _as_in_config(name, value)
        got = _as_in_config(name, config[name])
        assert got == want, (
            f"{case}: the layer was given {name}={value!r}, its config "
            f"says {config[name]!r}")
    try:
        as_json = json.dumps(config, sort_keys=True)
    except TypeError as error:
        raise AssertionError(
            f"{case}: get_config() does not survive JSON (what a .keras "
            f"file stores): {error}") from error

    clone = case.cls.from_config(config)
    assert type(clone) is case.cls, (case, type(clone))
    assert clone.get_config() == config, (
        f"{case}: from_config(config).get_config() differs from config:\n"
        f"{_config_diff(config, clone.get_config())}")
    clone = case.cls.from_config(json.loads(as_json))
    assert json.dumps(clone.get_config(), sort_keys=True) == as_json, (
        f"{case}: the config read back from JSON gives another config:\n"
        f"{_config_diff(config, clone.get_config())}")
    try:
        case.cls.from_config({**config, "bogus_argument": 1})
    except (TypeError, ValueError) as error:
        assert "bogus_argument" in str(error), (case, error)
    else:
        raise AssertionError(
            f"{case}: from_config accepted an unknown key, bogus_argument")

    serialized = keras.saving.serialize_keras_object(layer)
    name = keras.saving.get_registered_name(case.cls)
    assert serialized["registered_name"] == name, (case, serialized)
    assert keras.saving.get_registered_object(name) is case.cls, (
        f"{case}: {case.cls.__name__} is not registered as {name!r}: "
        "safe_mode loading cannot find it")
    restored = keras.saving.deserialize_keras_object(
        json.loads(json.dumps(serialized)), safe_mode=True)
    assert type(restored) is case.cls, (case, type(restored))
    assert restored.get_config() == config, (
        f"{case}: deserialize(serialize(layer)) has another config:\n"
        f"{_config_diff(config, restored.get_config())}")


def _check_build(case):
    built = _seeded(case, lambda: case.cls(**case.init_kwargs))
    _build(case, built)
    assert built.built, f"{case}: build() left the layer unbuilt"
    assert len(built.trainable_weights) == case.num_trainable_weights, (
        case, [w.path for w in built.trainable_weights])
    assert len(built.non_trainable_weights) == (
        case.num_non_trainable_weights
    ), (case, [w.path for w in built.non_trainable_weights])

    called = case.cls(**case.init_kwargs)
    _call(case, called, _eager_inputs(case), training=False)
    assert _weight_shapes(called) == _weight_shapes(built), (
        f"{case}: build() and a call build different weights")

    config = built.get_config()
    rebuilt = _seeded(case, lambda: case.cls.from_config(config))
    _build(case, rebuilt)
    assert _weight_shapes(rebuilt) == _weight_shapes(built), case
    for want, got in zip(built.weights, rebuilt.weights):
        np.testing.assert_array_equal(
            got.numpy(), want.numpy(),
            err_msg=f"{case}: {want.path}: a layer from the config starts "
            "from other weights under the same seed (an initializer lost in "
            "the config?)")


def _check_symbolic_and_eager_calls(case):
    layer = case.cls(**case.init_kwargs)
    symbolic_inputs = _symbolic_inputs(case)
    outputs = _call(case, layer, symbolic_inputs)
    _assert_outputs(case, outputs, "float32", "symbolic call",
                    symbolic=True)
    model = keras.Model(symbolic_inputs, outputs)
    _randomize_weights(layer, case.seed)

    inputs = _eager_inputs(case)
    eager = _call(case, layer, inputs, training=False)
    _assert_outputs(case, eager, "float32", "eager call")
    assert len(layer.losses) == case.num_losses, (
        f"{case}: {len(layer.losses)} add_loss terms, not {case.num_losses}")
    _assert_equal_outputs(case, model(inputs, training=False), eager,
                          "the functional model's outputs")
    return model, layer, eager


def _check_keras_file(case, model, layer, eager, tmp_path):
    path = os.path.join(str(tmp_path), f"{case.id}.keras")
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    loaded_layer = loaded.get_layer(layer.name)
    assert type(loaded_layer) is case.cls, (case, type(loaded_layer))
    assert loaded_layer.get_config() == layer.get_config(), (
        f"{case}: the loaded layer has another config:\n"
        f"{_config_diff(layer.get_config(), loaded_layer.get_config())}")
    _assert_equal_outputs(
        case, loaded(_eager_inputs(case), training=False), eager,
        "the loaded .keras model's outputs")
    assert len(loaded_layer.losses) == case.num_losses, (
        f"{case}: the loaded layer has {len(loaded_layer.losses)} add_loss "
        f"terms, not {case.num_losses}")


def _check_training_step(case, model, layer):
    floats = [
        keras.ops.sum(keras.ops.square(keras.ops.cast(x, "float32")))
        for x in keras.tree.flatten(model.outputs)
        if "float" in keras.backend.standardize_dtype(x.dtype)
    ]
    total = floats[0]
    for x in floats[1:]:
        total = total + x
    train_model = keras.Model(model.inputs, keras.ops.reshape(total, (1,)))
    with warnings.catch_warnings():
        # Keras warns when it falls back from XLA: asserted on below.
        warnings.simplefilter("ignore")
        # SGD: of Keras's optimizers, the one quickest to trace.
        train_model.compile(optimizer=keras.optimizers.SGD(0.1),
                            loss=_prediction_as_loss, jit_compile=True)
    assert train_model.jit_compile is case.supports_jit, (
        f"{case}: asked for XLA, Keras compiles "
        f"{'with' if train_model.jit_compile else 'without'} it; "
        f"{case.cls.__name__}.supports_jit is {layer.supports_jit}, "
        f"expected {case.supports_jit}")
    inputs = _eager_inputs(case)
    data = tf.data.Dataset.from_tensors(
        (tuple(inputs) if len(inputs) > 1 else inputs[0],
         np.zeros((1,), "float32")))
    before = [w.numpy().copy() for w in train_model.trainable_weights]
    history = train_model.fit(data, epochs=1, shuffle=False,
                              verbose=0).history
    loss = history["loss"][0]
    assert np.isfinite(loss), (case, history)
    still = [w.path for w, b in zip(train_model.trainable_weights, before)
             if np.array_equal(w.numpy(), b)]
    assert not still, f"{case}: one fit step left {still} unchanged"
    missing = [name for name in case.metrics if name not in history]
    assert not missing, (
        f"{case}: the layer's metrics {missing} are not in fit's logs "
        f"{sorted(history)}")


def _check_mixed_precision(case):
    policy = keras.DTypePolicy(case.mixed_policy)
    layer = case.cls(**case.init_kwargs, dtype=policy)
    assert layer.compute_dtype == policy.compute_dtype, (
        case, layer.compute_dtype)
    inputs = _eager_inputs(case)
    for training in (False, True):
        outputs = _call(case, layer, inputs, training=training)
        _assert_outputs(case, outputs, policy.compute_dtype,
                        f"{case.mixed_policy} call, training={training}")
        for _, x in _leaves(outputs):
            if "float" in keras.backend.standardize_dtype(x.dtype):
                assert np.all(np.isfinite(np.asarray(
                    keras.ops.convert_to_numpy(x), "float32"))), (
                    f"{case}: non-finite {case.mixed_policy} outputs")
        assert len(layer.losses) == case.num_losses, case
        for loss in layer.losses:
            assert keras.backend.standardize_dtype(loss.dtype) == "float32", (
                f"{case}: a {loss.dtype} loss under {case.mixed_policy}")
    symbolic = _call(case, layer, _symbolic_inputs(case))
    _assert_outputs(case, symbolic, policy.compute_dtype,
                    f"{case.mixed_policy} symbolic call", symbolic=True)
    not_float32 = [
        (w.path, w.dtype) for w in layer.weights
        if "float" in keras.backend.standardize_dtype(w.dtype)
        and keras.backend.standardize_dtype(w.dtype) != "float32"
    ]
    assert not not_float32, (
        f"{case}: variables not float32 under {case.mixed_policy}: "
        f"{not_float32}")


# --------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------


def _prediction_as_loss(y_true, y_pred):
    """The model's output is its loss already."""
    return y_pred


_GETTERS = {
    "initializer": keras.initializers,
    "regularizer": keras.regularizers,
    "constraint": keras.constraints,
    "activation": keras.activations,
}


def _as_in_config(name, value):
    """`value`, an argument `name` or its config entry, in one form: Keras
    objects (by the Keras naming of their arguments) serialized, tuples as
    JSON lists."""
    module = _GETTERS.get(name.rsplit("_", 1)[-1])
    if module is not None and value is not None:
        value = module.serialize(module.get(value))
    elif hasattr(value, "get_config"):
        value = keras.saving.serialize_keras_object(value)
    return json.loads(json.dumps(value, sort_keys=True))


def _seeded(case, make):
    keras.utils.set_random_seed(case.seed)
    return make()


def _eager_inputs(case):
    return [keras.ops.convert_to_tensor(v) for v in case.inputs.values()]


def _symbolic_inputs(case):
    inputs = []
    for name, value in case.inputs.items():
        value = np.asarray(value)
        shape = value.shape if name in case.unbatched else (
            (None,) + value.shape[1:])
        inputs.append(keras.Input(batch_shape=shape, dtype=value.dtype.name,
                                  name=name))
    return inputs


def _call(case, layer, inputs, **kwargs):
    names = list(case.inputs)
    tensors = dict(zip(names[1:], inputs[1:]))
    return layer(inputs[0], **tensors, **case.call_kwargs, **kwargs)


def _build(case, layer):
    """`layer.build` on the first input's shape, and `{name}_shape` for
    each other input `build` takes (Keras's own convention)."""
    shapes = {name: np.shape(v) for name, v in case.inputs.items()}
    first, *others = shapes
    parameters = inspect.signature(layer.build).parameters
    layer.build(shapes[first], **{
        f"{name}_shape": shapes[name] for name in others
        if f"{name}_shape" in parameters})


def _leaves(structure):
    return keras.tree.flatten_with_path(structure)


def _assert_outputs(case, outputs, compute_dtype, what, symbolic=False):
    """`outputs` have the structure, shapes and dtypes of `case.outputs`."""
    want = _leaves(case.outputs)
    got = _leaves(outputs)
    assert [p for p, _ in got] == [p for p, _ in want], (
        f"{case}, {what}: outputs {[p for p, _ in got]}, expected "
        f"{[p for p, _ in want]}")
    for (path, spec), (_, x) in zip(want, got):
        shape = tuple(x.shape)
        if symbolic:
            ok = shape == spec.shape
        else:
            ok = len(shape) == len(spec.shape) and all(
                w is None or w == g for w, g in zip(spec.shape, shape))
        assert ok, f"{case}, {what}: output {path} has shape {shape}, " \
            f"expected {spec.shape}"
        dtype = compute_dtype if spec.dtype == COMPUTE else spec.dtype
        got_dtype = keras.backend.standardize_dtype(x.dtype)
        assert got_dtype == dtype, (
            f"{case}, {what}: output {path} is {got_dtype}, expected {dtype}")


def _assert_equal_outputs(case, got, want, what):
    got, want = _leaves(got), _leaves(want)
    assert [p for p, _ in got] == [p for p, _ in want], (
        f"{case}: {what} are {[p for p, _ in got]}, the layer's "
        f"{[p for p, _ in want]}")
    for (path, g), (_, w) in zip(got, want):
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(g), keras.ops.convert_to_numpy(w),
            err_msg=f"{case}: {what} differ from the layer's at {path}")


def _weight_shapes(layer):
    return [(w.name, tuple(w.shape)) for w in layer.weights]


def _randomize_weights(layer, seed):
    """Random float weights, so that no routing is all ties and no output
    is equal to another's by accident."""
    rng = np.random.default_rng(seed)
    for w in layer.weights:
        if "float" in keras.backend.standardize_dtype(w.dtype):
            w.assign(0.5 * rng.normal(size=w.shape).astype("float32"))


def _config_diff(want, got):
    keys = sorted(set(want) | set(got))
    return "\n".join(
        f"  {key}: {want.get(key, '<missing>')!r} -> "
        f"{got.get(key, '<missing>')!r}"
        for key in keys if want.get(key, "<missing>") != got.get(
            key, "<missing>"))
