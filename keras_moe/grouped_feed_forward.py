"""The experts' feed-forward layers over grouped rows or per-expert slabs,
with a gradient written for many experts with few rows each."""

import tensorflow as tf

from keras_moe import xla

# Up to this many rows in the largest group, the backward pass uses the
# forms that are fast for small groups on CPU (see `grouped_feed_forward`);
# past it, autodiff's forms, which are as fast there and need no padded or
# transposed copies.
SMALL_GROUP_ROWS = 64


def grouped_feed_forward(x, kernels, part_sizes, between_layers):
    """Each group of rows of `x` through its own stack of matmuls.

    Rows `sum(part_sizes[:i])` to `sum(part_sizes[:i + 1])` of `x` (group,
    or expert, `i`) go through `z_l = a_l @ kernels[l][i]`,
    `a_{l+1} = between_layers(l, z_l)` for every layer `l`; the result is
    the last `a`, in the same row order. A group with no rows reads no
    weights.

    The gradient is hand-written because autodiff's is slow on CPU when
    groups have few rows (many experts, small batches). When the largest
    group has at most `SMALL_GROUP_ROWS` rows:
    - the input gradient of group `i` is `transpose(kernel[i] @
      transpose(dz_i))`, which reads `kernel[i]` in its stored order;
      autodiff's `dz_i @ transpose(kernel[i])` is 3 to 6x slower;
    - each kernel's gradient is one batched matmul of the groups padded to
      the largest, which writes the stacked `[groups, in, out]` gradient
      directly; autodiff stacks per-group pieces (a second full-size copy).
    Otherwise it computes autodiff's forms. Either way the groups stay
    separate, as in autodiff, so no `[rows, hidden]` tensor is built, and
    only the matmul outputs `z_l` are kept for the backward pass
    (`between_layers` is recomputed there).

    Args:
        x: a float tensor `[rows, in]`, grouped.
        kernels: a list of float tensors `[groups, in_l, out_l]` with a
            static number of groups, the dtype of `x`.
        part_sizes: int tensor `[groups]` summing to `rows`.
        between_layers: `f(layer, z)`, elementwise and differentiable: what
            follows the matmul of layer `layer` (scaling, activation).

    Returns:
        A tensor `[rows, out]`.

    Example:

    >>> x = tf.ones([3, 2])
    >>> kernel = tf.stack([tf.eye(2), 2.0 * tf.eye(2)])
    >>> y = grouped_feed_forward(
    ...     x, [kernel, kernel], tf.constant([1, 2]),
    ...     lambda layer, z: tf.nn.relu(z) if layer == 0 else z)
    >>> y.numpy().tolist()
    [[1.0, 1.0], [4.0, 4.0], [4.0, 4.0]]
    """
    num_groups = kernels[0].shape[0]
    if num_groups is None:
        raise ValueError(
            f"`kernels` must have a static number of groups. "
            f"Received: kernels[0].shape={kernels[0].shape}"
        )
    if x.shape.rank != 2:
        raise ValueError(
            f"`x` must be 2-D [rows, in]. Received: x.shape={x.shape}"
        )

    def layer_backward(inputs, d_outputs, group_kernels):
        return tf.cond(
            tf.reduce_max(part_sizes) <= SMALL_GROUP_ROWS,
            lambda: _small_group_backward(
                inputs, d_outputs, group_kernels, part_sizes
            ),
            lambda: _autodiff_backward(inputs, d_outputs, group_kernels),
        )

    return _recomputing_stack(
        x,
        kernels,
        split_rows=lambda t: tf.split(
            t, part_sizes, num=num_groups, axis=0
        ),
        # Unstacking shares the kernels' buffers: no copy.
        split_kernel=lambda k: tf.unstack(k, num=num_groups),
        between_layers=between_layers,
        layer_backward=layer_backward,
    )


def slab_feed_forward(x, kernels, between_layers):
    """Each expert's slab of rows through its own stack of matmuls.

    The capacity dispatch's experts: `z_l = a_l @ kernels[l]` slab by
    slab over `[groups, capacity, in_l]`, `a_{l+1} = between_layers(l,
    z_l)`, the last `a` returned. Same numbers as autodiff; the gradient
    keeps only the matmul outputs `z_l` (`between_layers` is recomputed in
    the backward pass, which lowers the peak memory of a training step),
    and for slabs of at most `SMALL_GROUP_ROWS` rows computes the input
    gradient as `transpose(kernel @ transpose(dz))`, 3x faster on CPU than
    autodiff's `dz @ transpose(kernel)` (which larger slabs keep).

    Traced for XLA, or with a GPU or TPU visible, each layer is one batched
    matmul (static shapes: it compiles with XLA). Traced for a CPU without
    XLA, the slabs go through `grouped_feed_forward` as equal groups, one
    matmul per expert, which TensorFlow runs 2-3x faster there.

    Args:
        x: a float tensor `[groups, capacity, in]`.
        kernels: a list of float tensors `[groups, in_l, out_l]`, the dtype
            of `x`.
        between_layers: `f(layer, z)`, elementwise and differentiable: what
            follows the matmul of layer `layer` (scaling, activation).

    Returns:
        A tensor `[groups, capacity, out]`.

    Example:

    >>> kernel = tf.stack([tf.eye(2), 2.0 * tf.eye(2)])
    >>> y = slab_feed_forward(
    ...     tf.ones([2, 1, 2]), [kernel, kernel],
    ...     lambda layer, z: tf.nn.relu(z) if layer == 0 else z)
    >>> y[:, 0].numpy().tolist()
    [[1.0, 1.0], [4.0, 4.0]]
    """
    if x.shape.rank != 3:
        raise ValueError(
            f"`x` must be 3-D [groups, capacity, in]. "
            f"Received: x.shape={x.shape}"
        )
    if _slabs_as_groups():
        # On a CPU without XLA, TensorFlow's batched matmul with small
        # slabs is 2-3x slower than one matmul per expert.
        num_groups, capacity = kernels[0].shape[0], tf.shape(x)[1]
        y = grouped_feed_forward(
            tf.reshape(x, [-1, x.shape[2]]),
            kernels,
            tf.fill([num_groups], capacity),
            between_layers,
        )
        return tf.reshape(y, [num_groups, x.shape[1] or -1, y.shape[1]])

    def layer_backward(inputs, d_outputs, kernels):
        (a,), (dz,), (kernel,) = inputs, d_outputs, kernels

        def untransposed():
            return tf.transpose(
                tf.matmul(kernel, dz, transpose_b=True), [0, 2, 1]
            )

        def usual():
            return tf.matmul(dz, kernel, transpose_b=True)

        capacity = a.shape[1]
        if capacity is not None:
            da = untransposed() if capacity <= SMALL_GROUP_ROWS else usual()
        else:
            da = tf.cond(
                tf.shape(a)[1] <= SMALL_GROUP_ROWS, untransposed, usual
            )
        return tf.matmul(a, dz, transpose_a=True), [da]

    return _recomputing_stack(
        x,
        kernels,
        split_rows=lambda t: [t],
        split_kernel=lambda k: [k],
        between_layers=between_layers,
        layer_backward=layer_backward,
    )


def slab_matmul(x, kernel):
    """`x [groups, capacity, in] @ kernel [groups, in, out]`, slab by slab:
    `slab_feed_forward` with one layer and nothing after it.

    Args:
        x: a float tensor `[groups, capacity, in]`.
        kernel: a float tensor `[groups, in, out]`, the dtype of `x`.

    Returns:
        A tensor `[groups, capacity, out]`.

    Example:

    >>> kernel = tf.stack([tf.eye(2), 2.0 * tf.eye(2)])
    >>> slab_matmul(tf.ones([2, 1, 2]), kernel)[:, 0].numpy().tolist()
    [[1.0, 1.0], [2.0, 2.0]]
    """
    return slab_feed_forward(x, [kernel], lambda layer, z: z)


def _slabs_as_groups():
    """Whether `slab_feed_forward` runs one matmul per expert: when tracing
    for a CPU without XLA (no GPU or TPU visible). Where XLA tracing cannot
    be detected, the batched form, which is right everywhere."""
    if xla.maybe_tracing_for_xla():
        return False
    return not any(
        tf.config.list_logical_devices(kind) for kind in ("GPU", "TPU")
    )


def _recomputing_stack(
    x, kernels, split_rows, split_kernel, between_layers, layer_backward
):
    """The layers on the parts of `x`, with a gradient that keeps only the
    matmul outputs.

    `split_rows(t)` cuts `x` (and the output gradient) into parts,
    `split_kernel(k)` a kernel into the parts' kernels;
    `layer_backward(inputs, d_outputs, part_kernels)` returns one layer's
    kernel gradient and its inputs' gradients (lists over parts).
    """
    num_layers = len(kernels)

    @tf.custom_gradient
    def forward(x, *kernels):
        x_parts = split_rows(x)
        part_kernels = [split_kernel(k) for k in kernels]
        # pre[l][i]: part i's matmul output at layer l.
        pre = []
        inputs = x_parts
        for layer in range(num_layers):
            z = [tf.matmul(a, k) for a, k in zip(inputs, part_kernels[layer])]
            pre.append(z)
            inputs = [between_layers(layer, zi) for zi in z]
        outputs = tf.concat(inputs, 0)

        def between_with_tapes(layer):
            """`between_layers(layer, z)` per part, recomputed from the
            saved `z` under a tape each, for its gradient."""
            tapes, values = [], []
            for zi in pre[layer]:
                with tf.GradientTape() as tape:
                    tape.watch(zi)
                    values.append(between_layers(layer, zi))
                tapes.append(tape)
            return tapes, values

        def grad(dy):
            d_out = split_rows(dy)
            d_kernels = [None] * num_layers
            tapes, values = between_with_tapes(num_layers - 1)
            for layer in reversed(range(num_layers)):
                d_pre = [
                    tape.gradient(a, z, output_gradients=g)
                    for tape, a, z, g in zip(tapes, values, pre[layer], d_out)
                ]
                # This layer's inputs, recomputed once: they also give the
                # previous layer's tapes.
                if layer == 0:
                    layer_inputs = x_parts
                else:
                    tapes, values = between_with_tapes(layer - 1)
                    layer_inputs = values
                d_kernels[layer], d_out = layer_backward(
                    layer_inputs, d_pre, part_kernels[layer]
                )
            return (tf.concat(d_out, 0), *d_kernels)

        return outputs, grad

    return forward(x, *kernels)


def _autodiff_backward(inputs, d_outputs, kernels):
    """What autodiff computes for `inputs[i] @ kernels[i]`: the stacked
    kernel gradient and the inputs' gradients."""
    d_kernel = tf.stack(
        [tf.matmul(a, g, transpose_a=True) for a, g in zip(inputs, d_outputs)]
    )
    d_inputs = [
        tf.matmul(g, k, transpose_b=True) for g, k in zip(d_outputs, kernels)
    ]
    return d_kernel, d_inputs


def _small_group_backward(inputs, d_outputs, kernels, part_sizes):
    """The same, in the forms that are fast for small groups on CPU."""
    # Each group's rows padded with zeros to the largest group (a gather
    # from one appended zero row); one batched matmul writes the stacked
    # gradient.
    rows = tf.reduce_sum(part_sizes)
    group_start = tf.cumsum(part_sizes, exclusive=True)
    slot = tf.range(tf.reduce_max(part_sizes))[None, :]
    row = tf.where(
        slot < part_sizes[:, None], group_start[:, None] + slot, rows
    )

    def pad(parts):
        zero_row = tf.zeros([1, tf.shape(parts[0])[1]], parts[0].dtype)
        flat = tf.concat(parts + [zero_row], 0)
        return tf.gather(flat, row)

    d_kernel = tf.matmul(pad(inputs), pad(d_outputs), transpose_a=True)
    d_inputs = [
        tf.transpose(tf.matmul(k, g, transpose_b=True))
        for g, k in zip(d_outputs, kernels)
    ]
    return d_kernel, d_inputs
