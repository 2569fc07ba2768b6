"""The size of a traced graph, to test that it does not grow with the
number of experts."""

import tensorflow as tf

# Inputs and constants, not counted: how TensorFlow writes them depends on
# their size (a large constant is a Fill of a shape and a value, a large
# captured tensor a Placeholder where a small one is a Const), not on the
# computation.
INPUT_OPS = ("Const", "Fill", "Placeholder")


def graph_size(fn):
    """Operations other than inputs and constants in the graph that
    `tf.function(fn)` traces with no arguments, its functions (loop bodies,
    conditions, gradients) included."""
    graph = tf.function(fn).get_concrete_function().graph.as_graph_def()
    nodes = list(graph.node)
    for function in graph.library.function:
        nodes.extend(function.node_def)
    return sum(node.op not in INPUT_OPS for node in nodes)


def training_step_size(layer, input_dim, rows=8):
    """`graph_size` of a training step of a built MoE layer (forward, its
    balancing loss, the gradients of its weights) on `[rows, input_dim]`."""
    x = tf.zeros([rows, input_dim])

    def train_step():
        with tf.GradientTape() as tape:
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * y) + tf.add_n(layer.losses)
        return tape.gradient(loss, layer.trainable_variables)

    return graph_size(train_step)
