"""Grouped matmul: row group `i` of `x` times `kernel[i]`, with a gradient
written for many small groups on CPU."""

import tensorflow as tf


def grouped_matmul(x, kernel, part_sizes):
    """Multiplies each group of rows of `x` by its own matrix.

    Rows `sum(part_sizes[:i])` to `sum(part_sizes[:i + 1])` of `x` are
    multiplied by `kernel[i]`: one matmul per group, the sparse experts'
    layer. A group with no rows reads no weights.

    The gradient is hand-written because autodiff's is slow when groups
    are small (a few rows each, as with many experts):
    - the input gradient of group `i` is computed as
      `transpose(kernel[i] @ transpose(dy_i))`, which reads `kernel[i]` in
      its stored order; TensorFlow's `dy_i @ transpose(kernel[i])` is up to
      6x slower on CPU when `dy_i` has few rows;
    - the kernel gradient is the groups' `transpose(x_i) @ dy_i` stacked
      once, with zeros for the groups that had no rows, which is what the
      gradient of `tf.unstack` does too, but without autodiff's extra
      aggregation of per-group pieces.

    Args:
        x: a float tensor `[rows, in]`, grouped.
        kernel: a float tensor `[groups, in, out]`, same dtype as `x`.
        part_sizes: int tensor `[groups]` summing to `rows`.

    Returns:
        A tensor `[rows, out]`.

    Example:

    >>> x = tf.ones([3, 2])
    >>> kernel = tf.stack([tf.eye(2), 2.0 * tf.eye(2)])
    >>> grouped_matmul(x, kernel, tf.constant([1, 2])).numpy().tolist()
    [[1.0, 1.0], [2.0, 2.0], [2.0, 2.0]]
    """
    num_groups = kernel.shape[0]
    if num_groups is None:
        raise ValueError(
            f"`kernel` must have a static number of groups. "
            f"Received: kernel.shape={kernel.shape}"
        )
    return _grouped_matmul(x, kernel, part_sizes, num_groups)


def _grouped_matmul(x, kernel, part_sizes, num_groups):
    @tf.custom_gradient
    def forward(x, kernel):
        x_parts = tf.split(x, part_sizes, num=num_groups, axis=0)
        # Unstacking shares the kernel's buffer: no copy.
        kernels = tf.unstack(kernel, num=num_groups)
        outputs = tf.concat(
            [tf.matmul(part, k) for part, k in zip(x_parts, kernels)], 0
        )

        def grad(dy):
            dy_parts = tf.split(dy, part_sizes, num=num_groups, axis=0)
            # [in, rows]: each group's kernel @ dy_i^T side by side, then
            # one transpose for all groups.
            dx_t = tf.concat(
                [
                    tf.matmul(k, g, transpose_b=True)
                    for k, g in zip(kernels, dy_parts)
                ],
                1,
            )
            dkernel = _kernel_gradient(
                x, dy, x_parts, dy_parts, part_sizes, num_groups
            )
            return tf.transpose(dx_t), dkernel

        return outputs, grad

    return forward(x, kernel)


# Padding each group to the largest costs this many rows per group before
# the batched kernel gradient loses to per-group matmuls and a stack: the
# stack reads and writes the whole gradient once more, worth about this
# many rows of GEMM at CPU rates (~100 GFLOP/s against ~10 GB/s).
_MAX_PADDING_ROWS_PER_GROUP = 32


def _kernel_gradient(x, dy, x_parts, dy_parts, part_sizes, num_groups):
    """`[groups, in, out]`: `transpose(x_i) @ dy_i` for every group."""
    rows = tf.shape(x)[0]
    max_rows = tf.reduce_max(part_sizes)

    def batched():
        # Each group's rows padded with zeros to `max_rows`; one batched
        # matmul writes the stacked gradient directly.
        group = tf.repeat(tf.range(num_groups), part_sizes)
        group_start = tf.cumsum(part_sizes, exclusive=True)
        slot = tf.stack(
            [group, tf.range(rows) - tf.gather(group_start, group)], 1
        )

        def pad(t):
            return tf.scatter_nd(
                slot, t, tf.stack([num_groups, max_rows, tf.shape(t)[1]])
            )

        return tf.matmul(pad(x), pad(dy), transpose_a=True)

    def stacked():
        return tf.stack(
            [
                tf.matmul(part, g, transpose_a=True)
                for part, g in zip(x_parts, dy_parts)
            ]
        )

    padding = num_groups * max_rows - rows
    return tf.cond(
        padding <= _MAX_PADDING_ROWS_PER_GROUP * num_groups, batched, stacked
    )
