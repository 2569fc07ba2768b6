"""SparseDispatcher: the original's dispatch, combine, expert_to_gates."""

import numpy as np
import pytest
import tensorflow as tf

import keras_moe
from numerics import ELEMENTWISE, assert_close

GATES = np.array(
    [
        [0.7, 0.3, 0.0],
        [0.0, 0.0, 1.0],
        [0.4, 0.0, 0.6],
        [0.0, 0.0, 0.0],  # routed nowhere
    ],
    np.float32,
)
INPUTS = np.arange(8, dtype=np.float32).reshape(4, 2)


def test_dispatch_sends_each_expert_its_rows_in_order():
    dispatcher = keras_moe.SparseDispatcher(3, GATES)
    parts = dispatcher.dispatch(INPUTS)
    assert len(parts) == 3
    np.testing.assert_array_equal(parts[0], INPUTS[[0, 2]])
    np.testing.assert_array_equal(parts[1], INPUTS[[0]])
    np.testing.assert_array_equal(parts[2], INPUTS[[1, 2]])
    assert dispatcher.part_sizes.numpy().tolist() == [2, 1, 2]
    assert dispatcher.expert_index.numpy().tolist() == [0, 0, 1, 2, 2]
    assert dispatcher.batch_index.numpy().tolist() == [0, 2, 0, 1, 2]


def test_expert_to_gates():
    gates = keras_moe.SparseDispatcher(3, GATES).expert_to_gates()
    # The gates themselves, gathered.
    np.testing.assert_array_equal(gates[0], GATES[[0, 2], 0])
    np.testing.assert_array_equal(gates[1], GATES[[0], 1])
    np.testing.assert_array_equal(gates[2], GATES[[1, 2], 2])


@pytest.mark.parametrize("multiply_by_gates", [True, False])
def test_combine_is_the_gate_weighted_sum(multiply_by_gates):
    dispatcher = keras_moe.SparseDispatcher(3, GATES)
    # Expert i multiplies by (i + 1).
    outputs = [(i + 1.0) * p for i, p in enumerate(dispatcher.dispatch(INPUTS))]
    combined = dispatcher.combine(outputs, multiply_by_gates=multiply_by_gates)
    weights = GATES if multiply_by_gates else (GATES > 0).astype(np.float32)
    expected = (weights * np.array([1.0, 2.0, 3.0])).sum(1, keepdims=True) * (
        INPUTS
    )
    assert_close(combined, expected, ELEMENTWISE, what="combined")
    np.testing.assert_array_equal(combined[3], [0.0, 0.0])


def test_dispatch_any_dtype_and_trailing_shape():
    dispatcher = keras_moe.SparseDispatcher(3, GATES)
    names = dispatcher.dispatch(tf.constant(["a", "b", "c", "d"]))
    assert [p.numpy().tolist() for p in names] == [
        [b"a", b"c"], [b"a"], [b"b", b"c"]
    ]
    positions = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], np.int32)
    parts = dispatcher.dispatch(positions)
    np.testing.assert_array_equal(parts[2], [[0, 1], [1, 0]])
    cube = np.ones([4, 2, 3], np.float32)
    combined = dispatcher.combine(dispatcher.dispatch(cube))
    assert_close(combined[:, 0, 0], GATES.sum(1), ELEMENTWISE,
                 what="combined")


def test_works_inside_tf_function_with_unknown_batch():
    @tf.function(input_signature=[tf.TensorSpec([None, 3]),
                                  tf.TensorSpec([None, 2])])
    def route(gates, inputs):
        dispatcher = keras_moe.SparseDispatcher(3, gates)
        parts = dispatcher.dispatch(inputs)
        return dispatcher.combine(parts), dispatcher.part_sizes

    combined, part_sizes = route(GATES, INPUTS)
    assert_close(combined, GATES.sum(1, keepdims=True) * INPUTS, ELEMENTWISE,
                 what="combined")
    assert part_sizes.numpy().tolist() == [2, 1, 2]


def test_empty_batch():
    dispatcher = keras_moe.SparseDispatcher(3, np.zeros([0, 3], np.float32))
    parts = dispatcher.dispatch(np.zeros([0, 2], np.float32))
    assert [p.shape[0] for p in parts] == [0, 0, 0]
    assert dispatcher.combine(parts).shape == (0, 2)


def test_bad_gates_and_expert_outputs():
    with pytest.raises(ValueError, match=r"gates.shape=\(4, 3\)"):
        keras_moe.SparseDispatcher(2, GATES)
    with pytest.raises(TypeError, match="gates.dtype=int32"):
        keras_moe.SparseDispatcher(3, np.ones([2, 3], np.int32))
    dispatcher = keras_moe.SparseDispatcher(3, GATES)
    with pytest.raises(ValueError, match="Received: 2 tensors"):
        dispatcher.combine(dispatcher.dispatch(INPUTS)[:2])


def test_integer_outputs_are_not_weighted_by_truncated_gates():
    dispatcher = keras_moe.SparseDispatcher(3, GATES)
    payload = np.arange(4, dtype=np.int32)[:, None]
    with pytest.raises(TypeError, match="expert_out.dtype=int32"):
        dispatcher.combine(dispatcher.dispatch(payload))
    with pytest.raises(TypeError, match="stitched.dtype=int32"):
        dispatcher.combine_concatenated(
            dispatcher.dispatch_concatenated(payload))
    # Unweighted, integers are summed as they are.
    summed = dispatcher.combine(dispatcher.dispatch(payload),
                                multiply_by_gates=False).numpy()[:, 0]
    np.testing.assert_array_equal(summed, payload[:, 0] * (GATES > 0).sum(1))


def test_wrong_row_counts():
    dispatcher = keras_moe.SparseDispatcher(3, GATES)
    with pytest.raises(ValueError, match=r"`inp` must have one row per row "
                       r"of `gates` \(4\). Received: inp.shape=\(3, 2\)"):
        dispatcher.dispatch(INPUTS[:3])
    parts = dispatcher.dispatch(INPUTS)
    with pytest.raises(ValueError, match=r"routed \(row, expert\) pair \(5\)"):
        dispatcher.combine_concatenated(tf.concat(parts, 0)[:4])

    @tf.function(input_signature=[tf.TensorSpec([None, 2])])
    def dispatch(x):
        return keras_moe.SparseDispatcher(3, GATES).dispatch_concatenated(x)

    with pytest.raises(tf.errors.InvalidArgumentError, match="`inp` must"):
        dispatch(INPUTS[:3])
