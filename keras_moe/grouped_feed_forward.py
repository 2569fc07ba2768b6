"""The experts' feed-forward layers over grouped rows, with a gradient
written for many experts with few rows each."""

import tensorflow as tf

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
    num_layers = len(kernels)

    @tf.custom_gradient
    def forward(x, *kernels):
        x_parts = tf.split(x, part_sizes, num=num_groups, axis=0)
        # Unstacking shares the kernels' buffers: no copy.
        group_kernels = [tf.unstack(k, num=num_groups) for k in kernels]
        # pre[l][i]: group i's matmul output at layer l.
        pre = []
        inputs = x_parts
        for layer in range(num_layers):
            z = [
                tf.matmul(a, k)
                for a, k in zip(inputs, group_kernels[layer])
            ]
            pre.append(z)
            inputs = [between_layers(layer, zi) for zi in z]
        outputs = tf.concat(inputs, 0)

        def between_with_tapes(layer):
            """`between_layers(layer, z)` per group, recomputed from the
            saved `z` under a tape each, for its gradient."""
            tapes, values = [], []
            for zi in pre[layer]:
                with tf.GradientTape() as tape:
                    tape.watch(zi)
                    values.append(between_layers(layer, zi))
                tapes.append(tape)
            return tapes, values

        def grad(dy):
            small = tf.reduce_max(part_sizes) <= SMALL_GROUP_ROWS
            d_out = tf.split(dy, part_sizes, num=num_groups, axis=0)
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
                d_kernel, d_out = tf.cond(
                    small,
                    lambda: _small_group_backward(
                        layer_inputs, d_pre, group_kernels[layer],
                        part_sizes,
                    ),
                    lambda: _autodiff_backward(
                        layer_inputs, d_pre, group_kernels[layer]
                    ),
                )
                d_kernels[layer] = d_kernel
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


def slab_matmul(x, kernel):
    """`x [groups, capacity, in] @ kernel [groups, in, out]`, slab by slab.

    The capacity dispatch's experts' layer: `tf.matmul` with, for slabs of
    at most `SMALL_GROUP_ROWS` rows, the input gradient computed as
    `transpose(kernel @ transpose(dy))`, 3x faster on CPU than autodiff's
    `dy @ transpose(kernel)` (which larger slabs keep).

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
    if x.shape.rank != 3:
        raise ValueError(
            f"`x` must be 3-D [groups, capacity, in]. "
            f"Received: x.shape={x.shape}"
        )
    return _slab_matmul(x, kernel)


@tf.custom_gradient
def _slab_matmul(x, kernel):
    def grad(dy):
        def untransposed():
            return tf.transpose(
                tf.matmul(kernel, dy, transpose_b=True), [0, 2, 1]
            )

        def usual():
            return tf.matmul(dy, kernel, transpose_b=True)

        capacity = x.shape[1]
        if capacity is not None:
            dx = untransposed() if capacity <= SMALL_GROUP_ROWS else usual()
        else:
            dx = tf.cond(
                tf.shape(x)[1] <= SMALL_GROUP_ROWS, untransposed, usual
            )
        return dx, tf.matmul(x, dy, transpose_a=True)

    return tf.matmul(x, kernel), grad
