"""Grouped matmul: group `i` of the rows of `x` times `kernel[i]`, with a
gradient written for many small groups on CPU."""

import tensorflow as tf


def grouped_matmul(x, kernel, part_sizes=None):
    """Multiplies each group of rows of `x` by its own matrix.

    The experts' layer: `kernel[i]` is expert `i`'s matrix. Two layouts:
    - ragged: `x` is `[rows, in]` grouped by expert, and rows
      `sum(part_sizes[:i])` to `sum(part_sizes[:i + 1])` are multiplied by
      `kernel[i]` (the sparse dispatch). A group with no rows reads no
      weights.
    - slabs: `x` is `[groups, capacity, in]` without `part_sizes`, and
      slab `i` is multiplied by `kernel[i]` (the capacity dispatch).

    The gradient is hand-written because autodiff's is slow on CPU when
    groups have few rows (many experts, small batches):
    - the input gradient of group `i` is `transpose(kernel[i] @
      transpose(dy_i))`, which reads `kernel[i]` in its stored order;
      autodiff's `dy_i @ transpose(kernel[i])` is 3 to 6x slower;
    - in the ragged layout, when the groups' sizes are close, the kernel
      gradient is one batched matmul of the groups padded to the largest,
      which writes the stacked `[groups, in, out]` gradient directly
      instead of stacking per-group pieces (autodiff's `Pack`, a second
      full-size copy). Groups that are far from even use the per-group
      matmuls, so that padding never costs more than it saves.

    Args:
        x: a float tensor `[rows, in]` grouped, or `[groups, capacity, in]`.
        kernel: a float tensor `[groups, in, out]` with a static number of
            groups, the dtype of `x`.
        part_sizes: int tensor `[groups]` summing to `rows`; only with 2-D
            `x`.

    Returns:
        A tensor `[rows, out]` or `[groups, capacity, out]`.

    Example:

    >>> x = tf.ones([3, 2])
    >>> kernel = tf.stack([tf.eye(2), 2.0 * tf.eye(2)])
    >>> grouped_matmul(x, kernel, tf.constant([1, 2])).numpy().tolist()
    [[1.0, 1.0], [2.0, 2.0], [2.0, 2.0]]
    >>> grouped_matmul(tf.ones([2, 1, 2]), kernel)[:, 0].numpy().tolist()
    [[1.0, 1.0], [2.0, 2.0]]
    """
    num_groups = kernel.shape[0]
    if num_groups is None:
        raise ValueError(
            f"`kernel` must have a static number of groups. "
            f"Received: kernel.shape={kernel.shape}"
        )
    if part_sizes is None:
        if x.shape.rank != 3:
            raise ValueError(
                f"Without `part_sizes`, `x` must be 3-D "
                f"[groups, capacity, in]. Received: x.shape={x.shape}"
            )
        return _slab_matmul(x, kernel)
    if x.shape.rank != 2:
        raise ValueError(
            f"With `part_sizes`, `x` must be 2-D [rows, in]. "
            f"Received: x.shape={x.shape}"
        )
    return _grouped_matmul(x, kernel, part_sizes, num_groups)


@tf.custom_gradient
def _slab_matmul(x, kernel):
    def grad(dy):
        dx = tf.transpose(
            tf.matmul(kernel, dy, transpose_b=True), [0, 2, 1]
        )
        return dx, tf.matmul(x, dy, transpose_a=True)

    return tf.matmul(x, kernel), grad


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
        # Each group's rows padded with zeros to `max_rows` (a gather from
        # one appended zero row); one batched matmul writes the stacked
        # gradient directly.
        group_start = tf.cumsum(part_sizes, exclusive=True)
        slot = tf.range(max_rows)[None, :]
        row = tf.where(
            slot < part_sizes[:, None], group_start[:, None] + slot, rows
        )

        def pad(t):
            return tf.gather(tf.concat([t, tf.zeros_like(t[:1])], 0), row)

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
