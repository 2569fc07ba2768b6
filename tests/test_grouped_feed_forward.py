"""grouped_feed_forward, slab_feed_forward and slab_matmul against autodiff of the same
per-expert computation, in both backward forms."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
import tensorflow as tf

from keras_moe import grouped_feed_forward as grouped_module
from keras_moe import private_hooks
from keras_moe.grouped_feed_forward import (
    gated_linear_unit,
    grouped_feed_forward,
    slab_feed_forward,
    slab_matmul,
)
from graph_size import graph_size
from numerics import FORWARD, GRADIENT, UNIT, assert_close

# float16: tolerance from its precision, not float32's. One float16
# rounding (eps 9.8e-4) is 512 of numerics' UNIT (16 float32 eps), so a
# float16 computation is compared at 512 times the float32 depth.
FLOAT16_DEPTH_FACTOR = round(float(np.finfo(np.float16).eps) / UNIT)

PART_SIZES = [
    [3, 0, 5, 1],
    [0, 0, 0, 0],
    [40, 0, 0, 1],
    [1, 1, 1, 1],
    [0, 7, 0, 0],
]


def _relu_scaled(layer, z):
    # The experts' default: autoscale after the hidden layer, no
    # activation after the last.
    return tf.nn.relu(z) if layer == 0 else z * 0.5


def _gelu_three_layers(layer, z):
    return tf.nn.gelu(z) if layer < 2 else z


BETWEEN = {
    "relu_2_layers": (_relu_scaled, (6, 7, 5)),
    "gelu_3_layers": (_gelu_three_layers, (6, 4, 3, 5)),
    "linear_1_layer": (lambda layer, z: z, (6, 5)),
}


def _reference(x, kernels, part_sizes, between_layers):
    """The same computation, expert by expert, left to autodiff."""
    num_experts = kernels[0].shape[0]
    outputs = []
    parts = tf.split(x, part_sizes, num=num_experts)
    per_expert = list(zip(*[tf.unstack(k, num=num_experts) for k in kernels]))
    for a, expert_kernels in zip(parts, per_expert):
        for layer, k in enumerate(expert_kernels):
            a = between_layers(layer, tf.matmul(a, k))
        outputs.append(a)
    return tf.concat(outputs, 0)


def _values_and_gradients(fn, x, kernels):
    with tf.GradientTape() as tape:
        tape.watch([x, *kernels])
        y = tf.cast(fn(x, kernels), tf.float32)
        # A non-linear loss so that dy differs per row.
        loss = tf.reduce_sum(y * tf.sin(y))
    return [y, *tape.gradient(loss, [x, *kernels])]


def _assert_same(ours, reference, x, kernels, depth_factor=1):
    """Outputs to FORWARD, gradients to GRADIENT (tests/numerics.py), each
    times `depth_factor` (FLOAT16_DEPTH_FACTOR for float16)."""
    got = _values_and_gradients(ours, x, kernels)
    want = _values_and_gradients(reference, x, kernels)
    names = ["outputs", "d_x"] + [f"d_kernel_{i}" for i in range(len(kernels))]
    for name, g, w in zip(names, got, want):
        assert g.shape == w.shape, name
        depth = FORWARD if name == "outputs" else GRADIENT
        assert_close(tf.cast(g, tf.float32), tf.cast(w, tf.float32),
                     depth * depth_factor, what=name)


def _inputs(part_sizes, sizes, dtype="float32", seed=0):
    rng = np.random.default_rng(seed)
    x = tf.constant(rng.normal(size=(sum(part_sizes), sizes[0])), dtype)
    kernels = [
        tf.constant(rng.normal(size=(len(part_sizes), a, b)) * 0.5, dtype)
        for a, b in zip(sizes[:-1], sizes[1:])
    ]
    return x, kernels, tf.constant(part_sizes, tf.int32)


# Gated linear units (`FeedForwardExperts(glu=True)`): a `between_layers`
# that halves the width. Two gated layers, so that the backward pass
# recomputes a gated layer's output as the next gated layer's input.
GLU_KERNEL_SHAPES = [(6, 8), (4, 6), (3, 5)]


def _glu_between(layer, z):
    # GeGLU at both hidden layers, the second one autoscaled as
    # FeedForwardExperts does (both halves), the last layer scaled.
    if layer == 0:
        return gated_linear_unit(z, tf.nn.gelu)
    if layer == 1:
        return gated_linear_unit(z * 0.7, tf.nn.gelu)
    return z * 0.5


def _glu_inputs(rows_shape, dtype="float32", num_experts=4):
    rng = np.random.default_rng(2)
    x = tf.constant(rng.normal(size=(*rows_shape, 6)), dtype)
    kernels = [
        tf.constant(rng.normal(size=(num_experts, a, b)) * 0.5, dtype)
        for a, b in GLU_KERNEL_SHAPES
    ]
    return x, kernels


def _use_loops(monkeypatch):
    """The loops over experts (many experts) for any number of experts, here
    3 experts a step and the rest one by one, so that both loops run."""
    monkeypatch.setattr(grouped_module, "MAX_UNROLLED_EXPERTS", 0)
    monkeypatch.setattr(grouped_module, "EXPERTS_PER_STEP", 3)


@pytest.fixture(params=["unrolled", "looped"])
def graph_form(request, monkeypatch):
    """Both graphs of `grouped_feed_forward`: one matmul per expert written
    into the graph (few experts), and the loops over experts."""
    if request.param == "looped":
        _use_loops(monkeypatch)
    return request.param


def _check_matches_autodiff(part_sizes, between, small_part_rows, traced,
                            monkeypatch):
    # The row limit picks the backward form: -1 always autodiff's, 1000
    # always the small-part one (padded batched kernel gradient,
    # untransposed input gradient).
    monkeypatch.setattr(grouped_module, "SMALL_PART_ROWS", small_part_rows)
    between_layers, sizes = BETWEEN[between]
    x, kernels, part_sizes = _inputs(part_sizes, sizes)

    def ours(x, kernels):
        return grouped_feed_forward(x, kernels, part_sizes, between_layers)

    def reference(x, kernels):
        return _reference(x, kernels, part_sizes, between_layers)

    if traced:
        ours, reference = tf.function(ours), tf.function(reference)
    _assert_same(ours, reference, x, kernels)


@pytest.mark.parametrize("part_sizes", PART_SIZES)
@pytest.mark.parametrize("between", sorted(BETWEEN))
@pytest.mark.parametrize(
    "small_part_rows", [-1, 1000], ids=["autodiff_forms", "small_forms"]
)
@pytest.mark.parametrize("traced", [False, True], ids=["eager", "function"])
def test_matches_autodiff(part_sizes, between, small_part_rows, traced,
                          monkeypatch):
    _check_matches_autodiff(part_sizes, between, small_part_rows, traced,
                            monkeypatch)


# The loops over experts trace slowly: every backward form, on empty,
# one-row and large parts, with the deepest stack of layers.
@pytest.mark.parametrize("part_sizes", PART_SIZES[:3])
@pytest.mark.parametrize(
    "small_part_rows", [-1, 1000], ids=["autodiff_forms", "small_forms"]
)
@pytest.mark.parametrize("traced", [False, True], ids=["eager", "function"])
def test_looped_matches_autodiff(part_sizes, small_part_rows, traced,
                                 monkeypatch):
    _use_loops(monkeypatch)
    _check_matches_autodiff(part_sizes, "gelu_3_layers", small_part_rows,
                            traced, monkeypatch)


def test_expert_without_rows_gets_zero_kernel_gradient(graph_form):
    x, kernels, part_sizes = _inputs([2, 0, 3], (6, 7, 5))
    _, _, *d_kernels = _values_and_gradients(
        lambda x, k: grouped_feed_forward(x, k, part_sizes, _relu_scaled),
        x, kernels,
    )
    for d_kernel in d_kernels:
        assert float(tf.reduce_max(tf.abs(d_kernel[1]))) == 0.0
        assert float(tf.reduce_max(tf.abs(d_kernel[0]))) > 0.0


def test_float16(graph_form):
    x, kernels, part_sizes = _inputs([2, 3, 0, 4], (6, 7, 5), "float16")
    y = grouped_feed_forward(x, kernels, part_sizes, _relu_scaled)
    assert y.dtype == tf.float16
    _assert_same(
        lambda x, k: grouped_feed_forward(x, k, part_sizes, _relu_scaled),
        lambda x, k: _reference(x, k, part_sizes, _relu_scaled),
        x, kernels, depth_factor=FLOAT16_DEPTH_FACTOR,
    )


def test_graph_size_does_not_grow_with_the_number_of_experts():
    def train_step(num_experts):
        # The same rows whatever the number of experts: a large constant is
        # captured differently from a small one.
        x, kernels, part_sizes = _inputs(
            [3] * 4 + [0] * (num_experts - 4), (6, 7, 5))
        return lambda: _values_and_gradients(
            lambda x, k: grouped_feed_forward(
                x, k, part_sizes, _relu_scaled), x, kernels)

    unrolled = [graph_size(train_step(n)) for n in (8, 16)]
    assert unrolled[1] > unrolled[0] + 8 * 10  # one matmul (and more) each
    # Past MAX_UNROLLED_EXPERTS, the loops: the same graph for any number of
    # experts with the same remainder of EXPERTS_PER_STEP.
    step = grouped_module.EXPERTS_PER_STEP
    many = grouped_module.MAX_UNROLLED_EXPERTS + 1
    looped = [graph_size(train_step(many + n * step)) for n in (0, 10, 100)]
    assert looped[0] == looped[1] == looped[2], looped
    assert looped[0] < unrolled[1] * 4


def test_unknown_number_of_experts_is_an_error():
    fn = tf.function(
        lambda x, k, p: grouped_feed_forward(x, [k], p, _relu_scaled),
        input_signature=[
            tf.TensorSpec([None, 6]),
            tf.TensorSpec([None, 6, 5]),
            tf.TensorSpec([None], tf.int32),
        ],
    )
    with pytest.raises(ValueError, match=r"kernels\[0\].shape=\(None, 6, 5\)"):
        fn.get_concrete_function()


def _slab_reference(x, kernels, between_layers):
    for layer, kernel in enumerate(kernels):
        x = between_layers(layer, tf.matmul(x, kernel))
    return x


def _slab_inputs(capacity, sizes, dtype="float32"):
    rng = np.random.default_rng(1)
    x = tf.constant(rng.normal(size=(3, capacity, sizes[0])), dtype)
    kernels = [
        tf.constant(rng.normal(size=(3, a, b)) * 0.5, dtype)
        for a, b in zip(sizes[:-1], sizes[1:])
    ]
    return x, kernels


@pytest.fixture(params=[False, True], ids=["batched", "per_expert"])
def one_matmul_per_expert(request, monkeypatch):
    """Both ways of running slabs: one batched matmul per layer (XLA,
    GPUs) and one matmul per expert (CPU)."""
    monkeypatch.setattr(
        grouped_module, "_one_matmul_per_expert", lambda: request.param
    )
    return request.param


@pytest.mark.parametrize("capacity", [0, 1, 5, 70])
@pytest.mark.parametrize("between", sorted(BETWEEN))
@pytest.mark.parametrize(
    "traced", [None, "static", "dynamic"],
    ids=["eager", "static_capacity", "dynamic_capacity"],
)
def test_slabs_match_autodiff(capacity, between, traced,
                              one_matmul_per_expert):
    # More than SMALL_PART_ROWS rows per slab takes autodiff's input
    # gradient; a capacity unknown when tracing chooses at run time.
    between_layers, sizes = BETWEEN[between]
    x, kernels = _slab_inputs(capacity, sizes)

    def ours(x, *kernels):
        return slab_feed_forward(x, list(kernels), between_layers)

    def reference(x, *kernels):
        return _slab_reference(x, kernels, between_layers)

    if traced:
        capacity_dim = None if traced == "dynamic" else capacity
        signature = [tf.TensorSpec([3, capacity_dim, sizes[0]])] + [
            tf.TensorSpec(k.shape) for k in kernels
        ]
        ours = tf.function(ours, input_signature=signature)
        reference = tf.function(reference, input_signature=signature)
    _assert_same(
        lambda x, kernels: ours(x, *kernels),
        lambda x, kernels: reference(x, *kernels),
        x, kernels,
    )


@pytest.mark.parametrize("capacity", [2, 70])
def test_slab_matmul_is_a_batched_matmul(capacity, one_matmul_per_expert):
    x, kernels = _slab_inputs(capacity, (6, 5))
    _assert_same(
        lambda x, kernels: slab_matmul(x, kernels[0]),
        lambda x, kernels: tf.matmul(x, kernels[0]),
        x, kernels,
    )


def test_slabs_float16(one_matmul_per_expert):
    x, kernels = _slab_inputs(4, (6, 7, 5), "float16")
    assert slab_feed_forward(x, kernels, _relu_scaled).dtype == tf.float16
    _assert_same(
        lambda x, k: slab_feed_forward(x, k, _relu_scaled),
        lambda x, k: _slab_reference(x, k, _relu_scaled),
        x, kernels, depth_factor=FLOAT16_DEPTH_FACTOR,
    )


@pytest.mark.skipif(
    bool(tf.config.list_logical_devices("GPU")), reason="CPU choice"
)
def test_slabs_run_per_expert_on_cpu_but_batched_under_xla():
    def choice():
        return tf.constant(grouped_module._one_matmul_per_expert())

    assert bool(choice())
    assert bool(tf.function(choice)())
    assert not bool(tf.function(choice, jit_compile=True)())


def test_slabs_batched_when_xla_tracing_cannot_be_detected(monkeypatch):
    monkeypatch.setattr(private_hooks, "control_flow_util", None)
    assert not grouped_module._one_matmul_per_expert()


def test_slabs_compile_with_xla():
    x, kernels = _slab_inputs(4, (6, 7, 5))
    compiled = tf.function(
        lambda x, k: slab_feed_forward(x, k, _relu_scaled), jit_compile=True
    )
    _assert_same(
        compiled, lambda x, k: _slab_reference(x, k, _relu_scaled),
        x, kernels,
    )


@pytest.mark.parametrize(
    "fn, x_shape, message",
    [
        (lambda x: slab_matmul(x, tf.zeros([2, 6, 5])), (4, 6),
         r"must be 3-D .*x.shape=\(4, 6\)"),
        (lambda x: slab_feed_forward(
            x, [tf.zeros([2, 6, 5])], _relu_scaled), (2, 6),
         r"must be 3-D .*x.shape=\(2, 6\)"),
        (lambda x: grouped_feed_forward(
            x, [tf.zeros([2, 6, 5])], tf.constant([1, 1]), _relu_scaled),
         (2, 2, 6), r"must be 2-D .*x.shape=\(2, 2, 6\)"),
    ],
    ids=["slab_matmul", "slab_feed_forward", "grouped_feed_forward"],
)
def test_layout_errors_name_the_shape(fn, x_shape, message):
    with pytest.raises(ValueError, match=message):
        fn(tf.zeros(x_shape))


def test_former_constant_names_still_read():
    # Renamed from the *_GROUP* names, which stay as plain aliases.
    assert grouped_module.SMALL_GROUP_ROWS == grouped_module.SMALL_PART_ROWS
    assert (grouped_module.MAX_UNROLLED_GROUPS
            == grouped_module.MAX_UNROLLED_EXPERTS)
    assert grouped_module.GROUPS_PER_STEP == grouped_module.EXPERTS_PER_STEP


def test_gated_linear_unit_against_numpy():
    z = np.random.default_rng(3).normal(size=(2, 3, 8)).astype("float32")
    silu = lambda v: v / (1 + np.exp(-v))  # noqa: E731
    assert_close(gated_linear_unit(tf.constant(z), tf.nn.silu),
                 silu(z[..., :4]) * z[..., 4:], FORWARD)
    with pytest.raises(ValueError, match=r"z.shape=\(2, 5\)"):
        gated_linear_unit(tf.zeros([2, 5]), tf.nn.silu)


@pytest.mark.parametrize(
    "small_part_rows", [-1, 1000], ids=["autodiff_forms", "small_forms"]
)
def test_glu_matches_autodiff(small_part_rows, graph_form, monkeypatch):
    # Eager: the graphs' forms are those of test_matches_autodiff.
    monkeypatch.setattr(grouped_module, "SMALL_PART_ROWS", small_part_rows)
    part_sizes = tf.constant([3, 0, 5, 1])
    x, kernels = _glu_inputs([9])
    _assert_same(
        lambda x, k: grouped_feed_forward(x, k, part_sizes, _glu_between),
        lambda x, k: _reference(x, k, part_sizes, _glu_between),
        x, kernels,
    )


@pytest.mark.parametrize("capacity", [1, 70])
def test_glu_slabs_match_autodiff(capacity, one_matmul_per_expert):
    x, kernels = _glu_inputs([4, capacity])
    _assert_same(
        lambda x, k: slab_feed_forward(x, k, _glu_between),
        lambda x, k: _slab_reference(x, k, _glu_between),
        x, kernels,
    )


def test_glu_float16(one_matmul_per_expert):
    x, kernels = _glu_inputs([4, 3], "float16")
    _assert_same(
        lambda x, k: slab_feed_forward(x, k, _glu_between),
        lambda x, k: _slab_reference(x, k, _glu_between),
        x, kernels, depth_factor=FLOAT16_DEPTH_FACTOR,
    )


def test_glu_slabs_compile_with_xla():
    # The forward only: the backward's batched forms are those compared
    # above, and compiling them takes seconds.
    x, kernels = _glu_inputs([4, 3])
    compiled = tf.function(
        lambda x, k: slab_feed_forward(x, k, _glu_between), jit_compile=True)
    assert_close(compiled(x, kernels), _slab_reference(x, kernels,
                                                       _glu_between),
                 FORWARD)
