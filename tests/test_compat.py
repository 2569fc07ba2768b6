"""keras_moe.compat.load_tf1_checkpoint: TF1 checkpoints of the original.

tests/fixtures/tf1_checkpoints/ holds two checkpoints written by the
original expert_utils.py under tf.compat.v1 with `tf.compat.v1.train.Saver`
(tools/make_checkpoint_fixtures.py): a flat `LocalMixtureOfExperts` and a
hierarchical `DistributedMixtureOfExperts`, both named "moe", each with a
`global_step`; `outputs.npz` holds an input batch and the original's
inference outputs on it. Each loads into a fresh layer of the matching
configuration and reproduces those outputs.

The error cases (missing, extra and mis-shaped variables) use checkpoints
written here from numpy arrays with tf.compat.v1 (no original needed).
When the original is found (reference_harness.original.find_original), a
fresh checkpoint is written with it and loaded too. The configurations and
the writing are reference_harness.checkpoints'.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np
import pytest
import tensorflow as tf

import keras_moe
from keras_moe.compat import load_tf1_checkpoint
import numerics
from parity_checks import require_original
from reference_harness import checkpoints, fixtures, hierarchical

KINDS = checkpoints.COMMITTED_KINDS  # ("local", "hierarchical")
OUTPUTS = fixtures.FixtureFile(checkpoints.OUTPUTS)

# --------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------


def committed_prefix(kind):
    return checkpoints.prefix(kind)


def committed_outputs(kind):
    """(case, {"x", "y", "importance", "load"}) stored for `kind`."""
    case, data, results = OUTPUTS.get(checkpoints.CASES[kind]["name"])
    return case, dict(data, **results["ref"])


def read_checkpoint(prefix):
    """{name: value} of every variable in a checkpoint."""
    reader = tf.train.load_checkpoint(prefix)
    return {name: reader.get_tensor(name)
            for name in reader.get_variable_to_shape_map()}


def write_checkpoint(directory, arrays):
    """A TF1 checkpoint of `arrays` ({name: value}), written with
    tf.compat.v1.train.Saver in a tf.compat.v1.Graph. Returns its prefix."""
    v1 = tf.compat.v1
    graph = v1.Graph()
    with graph.as_default():
        variables = {name: v1.Variable(np.asarray(value), name="v%d" % i)
                     for i, (name, value) in enumerate(sorted(arrays.items()))}
        saver = v1.train.Saver(var_list=variables, save_relative_paths=True)
        with v1.Session(graph=graph) as sess:
            sess.run(v1.global_variables_initializer())
            os.makedirs(str(directory), exist_ok=True)
            return saver.save(sess, os.path.join(str(directory), "model.ckpt"),
                              write_meta_graph=False)


def make_layer(case, noisy=None, seed=0):
    """A built layer of `case`'s configuration, every weight set to random
    values (so that a load, or a partial one, would show)."""
    common = dict(
        k=case["k"],
        output_dim=case["output_dim"],
        hidden_sizes=case["hidden_sizes"],
        autoscale=case["autoscale"],
        noisy_gating=case["noisy_gating"] if noisy is None else noisy,
        noise_epsilon=case["noise_epsilon"],
    )
    if hierarchical.is_hierarchical(case):
        layer = keras_moe.HierarchicalMixtureOfExperts(
            num_groups=case["num_groups"],
            experts_per_group=case["experts_per_group"],
            group_k=case["group_k"], **common)
    else:
        layer = keras_moe.MixtureOfExperts(num_experts=case["num_experts"],
                                           **common)
    layer.build((None, case["input_dim"]))
    rng = np.random.RandomState(seed)
    for w in layer.weights:
        w.assign(rng.normal(size=w.shape).astype(np.float32))
    return layer


def snapshot(layer):
    return [(w.path, np.array(w.numpy())) for w in layer.weights]


def assert_unchanged(layer, before):
    after = snapshot(layer)
    assert [p for p, _ in after] == [p for p, _ in before]
    for (path, a), (_, b) in zip(after, before):
        np.testing.assert_array_equal(a, b, err_msg=path + " changed")


def layer_weights(layer, case):
    """The layer's weights named as hierarchical.make_data names them."""
    if not hierarchical.is_hierarchical(case):
        out = {"primary_gate_kernel": layer.gating.gate_kernel.numpy()}
        if layer.gating.noisy_gating:
            out["primary_noise_kernel"] = layer.gating.noise_kernel.numpy()
        for l, kernel in enumerate(layer.experts.kernels):
            out["kernel_%d" % l] = kernel.numpy()
        return out
    secondary, per_group = layer.secondary_gating, layer.experts_per_group
    out = {
        "primary_gate_kernel": layer.primary_gating.gate_kernel.numpy(),
        "secondary_gate_kernel": secondary.gate_kernel.numpy(),
    }
    if layer.primary_gating.noisy_gating:
        out["primary_noise_kernel"] = layer.primary_gating.noise_kernel.numpy()
        out["secondary_noise_kernel"] = secondary.noise_kernel.numpy()
    for l, kernel in enumerate(layer.experts.kernels):
        # [groups * experts_per_group, ...] -> [groups, experts_per_group, ...]
        out["kernel_%d" % l] = kernel.numpy().reshape(
            (layer.num_groups, per_group) + tuple(kernel.shape[1:]))
    return out


def assert_close(actual, desired, what):
    """The outputs of the original, as the parity tests compare them."""
    numerics.assert_close(actual, desired, numerics.FORWARD, what=what)


def assert_reproduces(layer, outputs, what):
    y, routing = layer(tf.constant(outputs["x"]), training=False,
                       return_routing=True)
    assert_close(y, outputs["y"], what + " y")
    assert_close(routing["importance"], outputs["importance"],
                 what + " importance")
    assert_close(routing["load"], outputs["load"], what + " load")


def moe_names(arrays, name="moe"):
    return sorted(n for n in arrays if n.startswith(name + "_"))


# --------------------------------------------------------------------------
# The committed checkpoints of the original.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["prefix", "directory"])
@pytest.mark.parametrize("kind", KINDS)
def test_original_checkpoint_reproduces_outputs(kind, source):
    case, outputs = committed_outputs(kind)
    layer = make_layer(case)
    prefix = committed_prefix(kind)
    path = prefix if source == "prefix" else os.path.dirname(prefix)
    loaded = load_tf1_checkpoint(layer, path, "moe")
    arrays = read_checkpoint(prefix)
    assert "global_step" in arrays  # present in the checkpoint, ignored
    assert sorted(loaded) == moe_names(arrays)
    assert_reproduces(layer, outputs, "%s checkpoint (%s)" % (kind, source))


@pytest.mark.parametrize("kind", KINDS)
def test_committed_checkpoints_are_current(kind):
    # The committed configuration and weights are what
    # reference_harness.checkpoints defines now; otherwise regenerate with
    # tools/make_checkpoint_fixtures.py.
    case, outputs = committed_outputs(kind)
    expected_case = checkpoints.CASES[kind]
    assert case == expected_case
    data = hierarchical.make_data(expected_case)
    np.testing.assert_array_equal(outputs["x"], data["x"])
    layer = make_layer(case)
    load_tf1_checkpoint(layer, committed_prefix(kind), "moe")
    got = layer_weights(layer, expected_case)
    names = hierarchical.weight_names(expected_case)
    assert sorted(got) == sorted(names)
    for name in names:
        np.testing.assert_array_equal(got[name], data[name], err_msg=name)
    arrays = read_checkpoint(committed_prefix(kind))
    assert int(arrays["global_step"]) == checkpoints.STEP
    assert OUTPUTS.meta["step"] == checkpoints.STEP


def test_checkpoint_fixtures_are_small():
    total = sum(os.path.getsize(os.path.join(d, f))
                for d, _, files in os.walk(checkpoints.DIRECTORY)
                for f in files)
    assert total < 200 * 1024, total


def test_flat_distributed_names(tmp_path):
    # A flat DistributedMixtureOfExperts names its gate
    # `{name}_primary_gating_*`; the experts are named as in the local MoE.
    case, outputs = committed_outputs("local")
    arrays = read_checkpoint(committed_prefix("local"))
    renamed = {n.replace("moe_gating_", "moe_primary_gating_"): v
               for n, v in arrays.items()}
    assert "moe_primary_gating_gate" in renamed
    assert "moe_gating_gate" not in renamed
    prefix = write_checkpoint(tmp_path, renamed)
    layer = make_layer(case)
    loaded = load_tf1_checkpoint(layer, prefix, "moe")
    assert "moe_primary_gating_noise" in loaded
    assert_reproduces(layer, outputs, "flat distributed names")


@pytest.mark.parametrize("kind", KINDS)
def test_unrelated_variables_are_ignored(tmp_path, kind):
    case, outputs = committed_outputs(kind)
    arrays = read_checkpoint(committed_prefix(kind))
    unrelated = {
        "other/kernel": np.ones((3, 2), np.float32),
        "moe_embedding": np.ones((7,), np.float32),
        "moe2_gating_gate": np.ones((2, 2), np.float32),
        "encoder/moe_0_layer_0": np.ones((2, 2), np.float32),
        "beta1_power": np.float32(0.9),
    }
    # Optimizer slots of the MoE's own variables (TF1 Adam) also stay out.
    for name in moe_names(arrays):
        unrelated[name + "/Adam"] = np.zeros_like(arrays[name])
        unrelated[name + "/Adam_1"] = np.zeros_like(arrays[name])
    prefix = write_checkpoint(tmp_path, {**arrays, **unrelated})
    layer = make_layer(case)
    loaded = load_tf1_checkpoint(layer, prefix, "moe")
    assert sorted(loaded) == moe_names(arrays)
    assert_reproduces(layer, outputs, "%s with unrelated variables" % kind)


@pytest.mark.parametrize("kind", KINDS)
def test_scoped_name(tmp_path, kind):
    # The original created its variables under the caller's variable scope.
    case, outputs = committed_outputs(kind)
    arrays = read_checkpoint(committed_prefix(kind))
    scoped = {("body/" + n if n.startswith("moe_") else n): v
              for n, v in arrays.items()}
    # A same-named MoE in another scope is not this one.
    scoped.update({"decoder/" + n: np.zeros_like(v)
                   for n, v in arrays.items() if n.startswith("moe_")})
    prefix = write_checkpoint(tmp_path, scoped)
    layer = make_layer(case)
    load_tf1_checkpoint(layer, prefix, "body/moe")
    assert_reproduces(layer, outputs, "%s under body/" % kind)


def test_one_group_of_a_hierarchical_checkpoint_as_a_flat_moe():
    # Group i of a hierarchical MoE "moe" is a LocalMixtureOfExperts named
    # "moe_secondary_i".
    case, _ = committed_outputs("hierarchical")
    flat_case = dict(case, num_experts=case["experts_per_group"],
                     num_groups=None, experts_per_group=None, group_k=None,
                     k=case["group_k"])
    layer = make_layer(flat_case)
    load_tf1_checkpoint(layer, committed_prefix("hierarchical"),
                        "moe_secondary_1")
    hier = make_layer(case)
    load_tf1_checkpoint(hier, committed_prefix("hierarchical"), "moe")
    group = hier.groups[1]
    for a, b in zip(layer.trainable_weights, group.trainable_weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


# --------------------------------------------------------------------------
# Errors: missing, extra and mis-shaped variables; nothing loaded.
# --------------------------------------------------------------------------

# kind -> error -> (names to drop, {name: new value}) applied to the
# committed checkpoint's variables; each name must appear in the message
# (with its shape, and for mismatches both shapes).
_F = np.float32
BAD = {
    "local": {
        # d=6, n=4, hidden (5,), output 3.
        "missing": (["moe_3_layer_1", "moe_gating_noise"], {}),
        "extra": ([], {"moe_4_layer_0": np.ones((6, 5), _F),
                       "moe_4_layer_1": np.ones((5, 3), _F)}),
        "shape": ([], {"moe_gating_gate": np.ones((7, 4), _F),
                       "moe_1_layer_0": np.ones((6, 6), _F)}),
    },
    "hierarchical": {
        # d=6, n1=3, n2=2, hidden (4,), output 6.
        "missing": (["moe_secondary_2_1_layer_0",
                     "moe_secondary_1_gating_noise",
                     "moe_primary_gating_gate"], {}),
        "extra": ([], {"moe_secondary_0_2_layer_0": np.ones((6, 4), _F),
                       "moe_secondary_3_gating_gate": np.ones((6, 2), _F),
                       "moe_secondary_3_0_layer_1": np.ones((4, 6), _F)}),
        "shape": ([], {"moe_secondary_1_0_layer_1": np.ones((4, 7), _F),
                       "moe_primary_gating_noise": np.ones((6, 4), _F)}),
    },
}


def _check_error(excinfo, kind, errors, arrays):
    message = str(excinfo.value)
    for error in errors:
        drop, add = BAD[kind][error]
        for name in drop:
            assert name in message, (name, message)
            assert str(tuple(arrays[name].shape)) in message, (name, message)
        for name, value in add.items():
            assert name in message, (name, message)
            assert str(tuple(value.shape)) in message, (name, message)
            if error == "shape":
                assert str(tuple(arrays[name].shape)) in message, (
                    name, message)


def _bad_arrays(arrays, kind, errors):
    bad = dict(arrays)
    for error in errors:
        drop, add = BAD[kind][error]
        for name in drop:
            del bad[name]
        bad.update(add)
    return bad


@pytest.mark.parametrize(
    "errors", [("missing",), ("extra",), ("shape",),
               ("missing", "extra", "shape")],
    ids=["missing", "extra", "shape", "all_three"])
@pytest.mark.parametrize("kind", KINDS)
def test_bad_checkpoint_raises_and_loads_nothing(tmp_path, kind, errors):
    case, _ = committed_outputs(kind)
    arrays = read_checkpoint(committed_prefix(kind))
    prefix = write_checkpoint(tmp_path, _bad_arrays(arrays, kind, errors))
    layer = make_layer(case)
    before = snapshot(layer)
    with pytest.raises(ValueError) as excinfo:
        load_tf1_checkpoint(layer, prefix, "moe")
    _check_error(excinfo, kind, errors, arrays)
    assert_unchanged(layer, before)
    # The checkpoint's good variables differ from the layer's: had anything
    # been loaded, it would show.
    good = make_layer(case)
    load_tf1_checkpoint(good, committed_prefix(kind), "moe")
    assert any(not np.array_equal(a.numpy(), b)
               for a, (_, b) in zip(good.weights, before))


@pytest.mark.parametrize("bad", ["string", "integer", "nan", "inf"])
@pytest.mark.parametrize("kind", KINDS)
def test_bad_values_raise_before_anything_is_loaded(tmp_path, kind, bad):
    """A variable of the right name and shape whose values cannot be
    weights (text, integers, NaN, infinity) is refused like a missing one,
    before any weight is assigned; the gate kernels sort before it."""
    case, _ = committed_outputs(kind)
    arrays = read_checkpoint(committed_prefix(kind))
    noise = sorted(n for n in arrays if n.endswith("_gating_noise"))
    name = noise[-1]
    shape = arrays[name].shape
    if bad == "string":
        value = np.full(shape, b"0.5", dtype=object)
    elif bad == "integer":
        value = np.ones(shape, np.int32)
    else:
        value = np.array(arrays[name])
        value.flat[0] = np.nan if bad == "nan" else np.inf
    prefix = write_checkpoint(tmp_path, {**arrays, name: value})
    layer = make_layer(case)
    before = snapshot(layer)
    with pytest.raises(ValueError, match="nothing was loaded") as excinfo:
        load_tf1_checkpoint(layer, prefix, "moe")
    message = str(excinfo.value)
    assert name in message
    assert ("NaN or infinite" if bad in ("nan", "inf")
            else "not floating-point") in message
    assert_unchanged(layer, before)


@pytest.mark.parametrize("kind", KINDS)
def test_noise_kernels_must_match_noisy_gating(tmp_path, kind):
    case, _ = committed_outputs(kind)
    arrays = read_checkpoint(committed_prefix(kind))
    noise = sorted(n for n in arrays if n.endswith("_gating_noise"))
    assert noise
    # A clean layer has no noise kernels: the checkpoint's are extra.
    layer = make_layer(case, noisy=False)
    before = snapshot(layer)
    with pytest.raises(ValueError) as excinfo:
        load_tf1_checkpoint(layer, committed_prefix(kind), "moe")
    for name in noise:
        assert name in str(excinfo.value)
    assert_unchanged(layer, before)
    # A noisy layer needs them: missing.
    prefix = write_checkpoint(
        tmp_path, {n: v for n, v in arrays.items() if n not in noise})
    layer = make_layer(case)
    before = snapshot(layer)
    with pytest.raises(ValueError) as excinfo:
        load_tf1_checkpoint(layer, prefix, "moe")
    for name in noise:
        assert name in str(excinfo.value)
    assert_unchanged(layer, before)


def test_wrong_name_raises():
    case, _ = committed_outputs("local")
    layer = make_layer(case)
    before = snapshot(layer)
    with pytest.raises(ValueError, match="mixture_0_layer_0"):
        load_tf1_checkpoint(layer, committed_prefix("local"), "mixture")
    assert_unchanged(layer, before)


@pytest.mark.parametrize("kwargs, message", [
    ({"router": "softmax_top_k"}, "SoftmaxTopKRouter"),
    ({"glu": True}, "glu=True"),
    ({"shared_expert_hidden_sizes": (4,)}, "a shared expert"),
])
def test_what_the_original_never_had_is_refused(kwargs, message):
    layer = keras_moe.MixtureOfExperts(4, hidden_sizes=(3,), **kwargs)
    layer.build((None, 5))
    with pytest.raises(ValueError, match=message):
        load_tf1_checkpoint(layer, committed_prefix("local"), "moe")


# --------------------------------------------------------------------------
# A checkpoint written now by the original (when it is found).
# --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(checkpoints.CASES))
def test_live_original_checkpoint(tmp_path, kind):
    module = require_original()
    prefix, outputs = checkpoints.write_original_checkpoint(
        module, kind, str(tmp_path / kind))
    case = checkpoints.CASES[kind]
    layer = make_layer(case)
    loaded = load_tf1_checkpoint(layer, prefix, "moe")
    arrays = read_checkpoint(prefix)
    assert sorted(loaded) == moe_names(arrays)
    if kind == "distributed":
        assert "moe_primary_gating_gate" in loaded
    assert_reproduces(layer, outputs, "live %s checkpoint" % kind)
    if kind in KINDS:
        # The committed checkpoint and outputs are what the original
        # writes and computes here.
        _, committed = committed_outputs(kind)
        for key in ("x", "y", "importance", "load"):
            assert_close(committed[key], outputs[key], "committed " + key)
        stored = read_checkpoint(committed_prefix(kind))
        assert sorted(stored) == sorted(arrays)
        for name in arrays:
            np.testing.assert_array_equal(stored[name], arrays[name],
                                          err_msg=name)
