"""The experts' feed-forward layers over each expert's rows or per-expert
slabs, with a gradient written for many experts with few rows each.

Expert `i` is slice `i` of every kernel, `kernels[l][i]`; its part is the
rows of `x` it gets, `part_sizes[i]` of them, the parts one after another
(what `SparseDispatcher.dispatch_concatenated` returns)."""

import tensorflow as tf

from keras_moe import xla

# Up to this many rows in the largest part, the backward pass uses the
# forms that are fast for small parts on CPU (see `grouped_feed_forward`);
# past it, autodiff's forms, which are as fast there and need no padded or
# transposed copies.
SMALL_PART_ROWS = 64

# With more experts than this, the experts go through a loop in the graph,
# `EXPERTS_PER_STEP` experts per step (the rest one by one), so that the
# graph and the time to trace it do not grow with the number of experts; up
# to it, one matmul per expert is written into the graph.
MAX_UNROLLED_EXPERTS = 32
EXPERTS_PER_STEP = 16

# The former names, kept so that code reading them still works (setting
# one changes nothing: the new names are the ones read).
SMALL_GROUP_ROWS = SMALL_PART_ROWS
MAX_UNROLLED_GROUPS = MAX_UNROLLED_EXPERTS
GROUPS_PER_STEP = EXPERTS_PER_STEP


def grouped_feed_forward(x, kernels, part_sizes, between_layers):
    """Each expert's part of the rows of `x` through its own stack of
    matmuls.

    Rows `sum(part_sizes[:i])` to `sum(part_sizes[:i + 1])` of `x` (the
    part of expert `i`) go through `z_l = a_l @ kernels[l][i]`,
    `a_{l+1} = between_layers(l, z_l)` for every layer `l`; the result is
    the last `a`, in the same row order. An expert with no rows reads no
    weights.

    The gradient is hand-written because autodiff's is slow on CPU when
    parts have few rows (many experts, small batches). When the largest
    part has at most `SMALL_PART_ROWS` rows:
    - the input gradient of part `i` is `transpose(kernel[i] @
      transpose(dz_i))`, which reads `kernel[i]` in its stored order;
      autodiff's `dz_i @ transpose(kernel[i])` is 3 to 6x slower;
    - each kernel's gradient is one batched matmul of the parts padded to
      the largest, which writes the stacked `[experts, in, out]` gradient
      directly; autodiff stacks per-expert pieces (a second full-size
      copy).
    Otherwise it computes autodiff's forms. Either way the parts stay
    separate, as in autodiff, and only the matmul outputs `z_l` are kept
    for the backward pass (`between_layers` is recomputed there).

    With up to `MAX_UNROLLED_EXPERTS` experts, each expert's matmuls are
    written into the graph. With more, they run in graph loops over the
    experts (`EXPERTS_PER_STEP` experts a step), the same matmuls with the
    same numbers, so that the graph, and the time to trace it, stay the
    same whatever the number of experts.

    Args:
        x: a float tensor `[rows, in]`, the parts one after another.
        kernels: a list of float tensors `[experts, in_l, out_l]` with a
            static number of experts, the dtype of `x`.
        part_sizes: int tensor `[experts]` summing to `rows`.
        between_layers: `f(layer, z)`, row by row and differentiable: what
            follows the matmul of layer `layer` (scaling, activation, a
            `gated_linear_unit`). Each row of its result depends only on
            the same row of `z`; it may change the width (a gated layer's
            kernel is twice as wide as the next layer's input).

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
    num_experts = kernels[0].shape[0]
    if num_experts is None:
        raise ValueError(
            f"`kernels` must have a static number of experts. "
            f"Received: kernels[0].shape={kernels[0].shape}"
        )
    if x.shape.rank != 2:
        raise ValueError(
            f"`x` must be 2-D [rows, in]. Received: x.shape={x.shape}"
        )

    if num_experts > MAX_UNROLLED_EXPERTS:
        return _looped_stack(x, kernels, part_sizes, between_layers)
    return _recomputing_stack(
        x,
        kernels,
        split_rows=lambda t: tf.split(
            t, part_sizes, num=num_experts, axis=0
        ),
        # Unstacking shares the kernels' buffers: no copy.
        split_kernel=lambda k: tf.unstack(k, num=num_experts),
        between_layers=between_layers,
        layer_backward=_parts_layer_backward(part_sizes),
    )


def _parts_layer_backward(part_sizes):
    """One layer's backward over parts of `part_sizes` rows: the forms that
    are fast for small parts on CPU, or autodiff's."""

    def layer_backward(inputs, d_outputs, expert_kernels):
        return tf.cond(
            tf.reduce_max(part_sizes) <= SMALL_PART_ROWS,
            lambda: _small_parts_backward(
                inputs, d_outputs, expert_kernels, part_sizes
            ),
            lambda: _autodiff_backward(inputs, d_outputs, expert_kernels),
        )

    return layer_backward


def slab_feed_forward(x, kernels, between_layers):
    """Each expert's slab of rows through its own stack of matmuls.

    The capacity dispatch's experts: `z_l = a_l @ kernels[l]` slab by
    slab over `[experts, capacity, in_l]`, `a_{l+1} = between_layers(l,
    z_l)`, the last `a` returned. Same numbers as autodiff; the gradient
    keeps only the matmul outputs `z_l` (`between_layers` is recomputed in
    the backward pass, which lowers the peak memory of a training step),
    and for slabs of at most `SMALL_PART_ROWS` rows computes the input
    gradient as `transpose(kernel @ transpose(dz))`, 3x faster on CPU than
    autodiff's `dz @ transpose(kernel)` (which larger slabs keep).

    Traced for XLA, or with a GPU or TPU visible, each layer is one batched
    matmul (static shapes: it compiles with XLA). Traced for a CPU without
    XLA, the slabs go through `grouped_feed_forward` as equal parts, one
    matmul per expert, which TensorFlow runs 2-3x faster there.

    Args:
        x: a float tensor `[experts, capacity, in]`.
        kernels: a list of float tensors `[experts, in_l, out_l]`, the dtype
            of `x`.
        between_layers: `f(layer, z)`, row by row and differentiable: what
            follows the matmul of layer `layer` (scaling, activation, a
            `gated_linear_unit`). Each row of its result depends only on
            the same row of `z`; it may change the width (a gated layer's
            kernel is twice as wide as the next layer's input).

    Returns:
        A tensor `[experts, capacity, out]`.

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
            f"`x` must be 3-D [experts, capacity, in]. "
            f"Received: x.shape={x.shape}"
        )
    if _one_matmul_per_expert():
        # On a CPU without XLA, TensorFlow's batched matmul with small
        # slabs is 2-3x slower than one matmul per expert.
        num_experts, capacity = kernels[0].shape[0], tf.shape(x)[1]
        y = grouped_feed_forward(
            tf.reshape(x, [-1, x.shape[2]]),
            kernels,
            tf.fill([num_experts], capacity),
            between_layers,
        )
        return tf.reshape(y, [num_experts, x.shape[1] or -1, y.shape[1]])

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
            da = untransposed() if capacity <= SMALL_PART_ROWS else usual()
        else:
            da = tf.cond(
                tf.shape(a)[1] <= SMALL_PART_ROWS, untransposed, usual
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


def gated_linear_unit(z, activation):
    """`activation(gate) * up` of the two halves of `z [..., 2 * h]`: a
    gated linear unit's hidden values from its fused matmul `a @ [W_gate,
    W_up]` (Dauphin et al. 2017, https://arxiv.org/abs/1612.08083; SwiGLU
    with `silu`, GeGLU with `gelu`, Shazeer 2020,
    https://arxiv.org/abs/2002.05202).

    Args:
        z: a float tensor whose last axis, of even size `2 * h`, holds the
            gate pre-activations then the up projections.
        activation: a callable applied to the gate half.

    Returns:
        A tensor `[..., h]`.

    Example:

    >>> z = tf.constant([[-1.0, 2.0, 3.0, 4.0]])
    >>> gated_linear_unit(z, tf.nn.relu).numpy().tolist()
    [[0.0, 8.0]]
    """
    width = z.shape[-1]
    if width is None or width % 2:
        raise ValueError(
            "`z` must have an even, static last axis: the gate half, then "
            f"the up half. Received: z.shape={z.shape}"
        )
    gate, up = tf.split(z, 2, axis=-1)
    return activation(gate) * up


def slab_matmul(x, kernel):
    """`x [experts, capacity, in] @ kernel [experts, in, out]`, slab by slab:
    `slab_feed_forward` with one layer and nothing after it.

    Args:
        x: a float tensor `[experts, capacity, in]`.
        kernel: a float tensor `[experts, in, out]`, the dtype of `x`.

    Returns:
        A tensor `[experts, capacity, out]`.

    Example:

    >>> kernel = tf.stack([tf.eye(2), 2.0 * tf.eye(2)])
    >>> slab_matmul(tf.ones([2, 1, 2]), kernel)[:, 0].numpy().tolist()
    [[1.0, 1.0], [2.0, 2.0]]
    """
    return slab_feed_forward(x, [kernel], lambda layer, z: z)


def _one_matmul_per_expert():
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

    @tf.custom_gradient
    def forward(x, *kernels):
        x_parts = split_rows(x)
        part_kernels = [split_kernel(k) for k in kernels]
        outputs, pre = _parts_forward(x_parts, part_kernels, between_layers)

        def grad(dy):
            d_x, d_kernels = _parts_backward(
                x_parts, pre, split_rows(dy), part_kernels, between_layers,
                layer_backward,
            )
            return (tf.concat(d_x, 0), *d_kernels)

        return tf.concat(outputs, 0), grad

    return forward(x, *kernels)


def _parts_forward(x_parts, part_kernels, between_layers):
    """Each part through its layers: `(outputs, pre)`, lists over parts;
    `pre[l][i]` is part i's matmul output at layer l."""
    pre = []
    inputs = x_parts
    for layer, kernels in enumerate(part_kernels):
        z = [tf.matmul(a, k) for a, k in zip(inputs, kernels)]
        pre.append(z)
        inputs = [between_layers(layer, zi) for zi in z]
    return inputs, pre


def _parts_backward(x_parts, pre, d_out, part_kernels, between_layers,
                    layer_backward):
    """The gradient of `_parts_forward` from its saved matmul outputs `pre`
    and the output gradients `d_out` (lists over parts): `(d_x, d_kernels)`,
    the inputs' gradients (a list over parts) and each layer's kernel
    gradient."""
    num_layers = len(part_kernels)

    def between_with_tapes(layer):
        """`between_layers(layer, z)` per part, recomputed from the saved
        `z` under a tape each, for its gradient."""
        tapes, values = [], []
        for zi in pre[layer]:
            with tf.GradientTape() as tape:
                tape.watch(zi)
                values.append(between_layers(layer, zi))
            tapes.append(tape)
        return tapes, values

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
    return d_out, d_kernels


def _looped_stack(x, kernels, part_sizes, between_layers):
    """`grouped_feed_forward` with the per-expert matmuls in graph loops.

    Only the matmuls are per expert: each goes through
    `_looped_expert_matmul`, whose loop bodies are the same whatever the
    number of experts; `between_layers` and its gradient run on all rows at
    once. Same forms and numbers as the unrolled graph, the same recomputing
    gradient (only the matmul outputs are kept).
    """
    num_layers = len(kernels)

    @tf.custom_gradient
    def forward(x, *kernels):
        pre = []
        inputs = x
        for layer, kernel in enumerate(kernels):
            z = _looped_expert_matmul(inputs, kernel, part_sizes)
            pre.append(z)
            inputs = between_layers(layer, z)

        def between_with_tape(layer):
            with tf.GradientTape() as tape:
                tape.watch(pre[layer])
                value = between_layers(layer, pre[layer])
            return tape, value

        def grad(dy):
            small_parts = tf.reduce_max(part_sizes) <= SMALL_PART_ROWS
            d_kernels = [None] * num_layers
            d_out = dy
            tape, value = between_with_tape(num_layers - 1)
            for layer in reversed(range(num_layers)):
                d_pre = tape.gradient(value, pre[layer],
                                      output_gradients=d_out)
                if layer == 0:
                    layer_inputs = x
                else:
                    tape, value = between_with_tape(layer - 1)
                    layer_inputs = value
                kernel = kernels[layer]
                d_kernels[layer], d_out = tf.cond(
                    small_parts,
                    lambda: (
                        _padded_kernel_gradient(
                            layer_inputs, d_pre, part_sizes),
                        _looped_expert_matmul(
                            d_pre, kernel, part_sizes, "untransposed"),
                    ),
                    lambda: (
                        _looped_kernel_gradient(
                            layer_inputs, d_pre, part_sizes, kernel.shape),
                        _looped_expert_matmul(
                            d_pre, kernel, part_sizes, "transposed"),
                    ),
                )
            return (d_out, *d_kernels)

        return inputs, grad

    return forward(x, *kernels)


def _expert_loops(num_experts):
    """`[(first expert, experts per step, steps)]`: `EXPERTS_PER_STEP`
    experts at a time, then those left over one at a time."""
    full_steps = num_experts // EXPERTS_PER_STEP
    loops = [(0, EXPERTS_PER_STEP, full_steps)] if full_steps else []
    if num_experts % EXPERTS_PER_STEP:
        loops.append((full_steps * EXPERTS_PER_STEP, 1,
                      num_experts % EXPERTS_PER_STEP))
    return loops


def _loop_over_experts(num_experts, body, dtype, inner_shape):
    """`body(first, size)` for every step of `_expert_loops(num_experts)`,
    `first` a scalar tensor; its results `[n, *inner_shape]` concatenated
    along their first axis, in expert order."""
    results = []
    for first, size, steps in _expert_loops(num_experts):
        array = tf.TensorArray(dtype, size=steps, infer_shape=False,
                               element_shape=[None, *inner_shape])

        def loop_body(step, array, first=first, size=size):
            return step + 1, array.write(step, body(first + step * size,
                                                    size))

        _, array = tf.while_loop(
            lambda step, _: step < steps, loop_body, (0, array))
        results.append(array.concat())
    return results[0] if len(results) == 1 else tf.concat(results, 0)


def _looped_expert_matmul(a, kernel, part_sizes, form="forward"):
    """Part `i` of the rows of `a` times `kernel[i]` (`form="forward"`),
    or times its transpose, as `dz @ transpose(k)` (`"transposed"`) or as
    `transpose(k @ transpose(dz))` (`"untransposed"`, faster on CPU for
    small parts): one matmul per expert, in a loop."""
    num_experts = kernel.shape[0]
    row_start = tf.concat([[0], tf.cumsum(part_sizes)], 0)
    out_dim = kernel.shape[1] if form != "forward" else kernel.shape[2]

    def body(first, size):
        rows = a[row_start[first]:row_start[first + size]]
        parts = tf.split(rows, part_sizes[first:first + size], num=size)
        expert_kernels = tf.unstack(kernel[first:first + size], num=size)
        if form == "forward":
            out = [tf.matmul(r, k) for r, k in zip(parts, expert_kernels)]
        elif form == "transposed":
            out = [tf.matmul(r, k, transpose_b=True)
                   for r, k in zip(parts, expert_kernels)]
        else:
            out = [tf.transpose(tf.matmul(k, r, transpose_b=True))
                   for r, k in zip(parts, expert_kernels)]
        return tf.concat(out, 0)

    return _loop_over_experts(num_experts, body, a.dtype, [out_dim])


def _padded_kernel_gradient(a, dz, part_sizes):
    """`stack_i(transpose(a_i) @ dz_i)` over the parts of the rows, as one
    batched matmul of the parts padded to the largest with zero rows (a
    gather from one appended zero row): fast for small parts on CPU."""
    rows = tf.shape(a)[0]
    part_start = tf.cumsum(part_sizes, exclusive=True)
    slot = tf.range(tf.reduce_max(part_sizes))[None, :]
    row = tf.where(
        slot < part_sizes[:, None], part_start[:, None] + slot, rows
    )

    def pad(t):
        return tf.gather(tf.concat([t, tf.zeros_like(t[:1])], 0), row)

    return tf.matmul(pad(a), pad(dz), transpose_a=True)


def _looped_kernel_gradient(a, dz, part_sizes, kernel_shape):
    """The same, one matmul per expert in a loop (large parts)."""
    row_start = tf.concat([[0], tf.cumsum(part_sizes)], 0)

    def body(first, size):
        start, end = row_start[first], row_start[first + size]
        sizes = part_sizes[first:first + size]
        a_parts = tf.split(a[start:end], sizes, num=size)
        dz_parts = tf.split(dz[start:end], sizes, num=size)
        return tf.stack([
            tf.matmul(ai, gi, transpose_a=True)
            for ai, gi in zip(a_parts, dz_parts)
        ])

    return _loop_over_experts(kernel_shape[0], body, a.dtype,
                              kernel_shape[1:])


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


def _small_parts_backward(inputs, d_outputs, kernels, part_sizes):
    """The same, in the forms that are fast for small parts on CPU."""
    # One batched matmul of the parts padded to the largest writes the
    # stacked gradient.
    d_kernel = _padded_kernel_gradient(
        tf.concat(inputs, 0), tf.concat(d_outputs, 0), part_sizes)
    d_inputs = [
        tf.transpose(tf.matmul(k, g, transpose_b=True))
        for g, k in zip(d_outputs, kernels)
    ]
    return d_kernel, d_inputs
