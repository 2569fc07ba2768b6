"""The methods bench_moe.py times in its own process, all on the same
weights and inputs (configs.make_data): our MixtureOfExperts (sparse and
capacity dispatch), the peer ("every expert on every token") and the oracle
(one dense FFN of an expert's shape on one contiguous batch), each as
`{mode: tf.function(x)}`."""

from configs import CAPACITY_FACTOR, EVAL_CAPACITY_FACTOR, LOSS_COEF


def build_ours(shape, data, dispatch):
    import keras_moe

    layer = keras_moe.MixtureOfExperts(
        shape["experts"], k=shape["k"], hidden_sizes=(shape["hidden"],),
        loss_coef=LOSS_COEF, dispatch=dispatch,
        capacity_factor=CAPACITY_FACTOR,
        eval_capacity_factor=EVAL_CAPACITY_FACTOR, seed=1,
    )
    layer.build((None, shape["d"]))
    layer.gating.gate_kernel.assign(data["gate_kernel"])
    layer.gating.noise_kernel.assign(data["noise_kernel"])
    layer.experts.kernels[0].assign(data["kernel_0"])
    layer.experts.kernels[1].assign(data["kernel_1"])
    return layer


def mode_functions(forward, weights, jit_compile=False):
    """{mode: tf.function(x)} from `forward(x, training) -> (y, aux)`: the
    training forward, the training forward + backward (gradients of
    `sum(y**2) + aux` w.r.t. `weights`) and the inference forward."""
    import tensorflow as tf

    def train_fwd(x):
        return forward(x, True)

    def train_fwd_bwd(x):
        with tf.GradientTape() as tape:
            y, aux = forward(x, True)
            loss = tf.reduce_sum(tf.square(y)) + aux
        return tape.gradient(loss, weights)

    def infer_fwd(x):
        return forward(x, False)

    return {name: tf.function(fn, jit_compile=jit_compile)
            for name, fn in (("train_fwd", train_fwd),
                             ("train_fwd_bwd", train_fwd_bwd),
                             ("infer_fwd", infer_fwd))}


def ours_functions(layer, jit_compile=False):
    """{mode: tf.function(x)} for one of our layers."""
    import tensorflow as tf

    def forward(x, training):
        y = layer(x, training=training)
        aux = tf.add_n(layer.losses)
        return y, aux

    return mode_functions(forward, layer.trainable_weights, jit_compile)


def dense_functions(layer, shape):
    """The peer, "every expert on every token": the gates of `layer`'s gating
    network weight the outputs of all experts (`layer`'s kernels) run on
    every token with einsum, [tokens, experts, hidden] intermediates."""
    import tensorflow as tf
    import keras_moe

    scale = (shape["hidden"] / shape["d"]) ** -0.5  # the experts' autoscale
    w1, w2 = layer.experts.kernels
    weights = [layer.gating.gate_kernel, layer.gating.noise_kernel, w1, w2]

    def forward(x, training):
        gates, load = layer.gating(x, training=training)
        h = tf.nn.relu(tf.einsum("td,edh->teh", x, w1.value))
        o = tf.einsum("teh,ehd->ted", h, w2.value)
        y = tf.einsum("ted,te->td", o, gates * scale)
        aux = LOSS_COEF * (keras_moe.cv_squared(tf.reduce_sum(gates, 0))
                           + keras_moe.cv_squared(load))
        return y, aux

    return mode_functions(forward, weights)


def oracle_functions(shape, data):
    """The oracle: relu(x @ W1) @ W2 on x [tokens * k, d]; its forward for
    every forward mode, the gradients of W1 and W2 for train_fwd_bwd."""
    import tensorflow as tf

    w1 = tf.Variable(data["kernel_0"][0])
    w2 = tf.Variable(data["kernel_1"][0])

    def fwd(x):
        return tf.matmul(tf.nn.relu(tf.matmul(x, w1)), w2)

    def fwd_bwd(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(fwd(x)))
        return tape.gradient(loss, [w1, w2])

    f, fb = tf.function(fwd), tf.function(fwd_bwd)
    return {"train_fwd": f, "train_fwd_bwd": fb, "infer_fwd": f}, (w1, w2)
