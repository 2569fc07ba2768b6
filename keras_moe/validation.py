"""Checks of arguments and inputs, each raising an error that names the
argument and the value received."""

import numbers

import tensorflow as tf


def check_int(name, value, minimum, maximum=None):
    """Returns `value` if it is an integer in `[minimum, maximum]`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"`{name}` must be an integer. Received: {name}={value!r} "
            f"(of type {type(value).__name__})"
        )
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else (
            f"between {minimum} and {maximum}"
        )
        raise ValueError(f"`{name}` must be {bound}. Received: {name}={value}")
    return int(value)


def check_non_negative_float(name, value):
    """Returns `value` as a float if it is a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"`{name}` must be a number. Received: {name}={value!r}"
        )
    value = float(value)
    if not value >= 0 or value == float("inf"):
        raise ValueError(
            f"`{name}` must be a finite number >= 0. Received: {name}={value}"
        )
    return value


def check_positive_float(name, value):
    """Returns `value` as a float if it is a finite number > 0."""
    value = check_non_negative_float(name, value)
    if value == 0:
        raise ValueError(f"`{name}` must be > 0. Received: {name}={value}")
    return value


def check_bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(
            f"`{name}` must be a bool. Received: {name}={value!r}"
        )
    return value


def check_sizes(name, value):
    """Returns a tuple of positive ints from a list/tuple (None means ())."""
    if value is None:
        return ()
    if isinstance(value, numbers.Integral) or not isinstance(
        value, (list, tuple)
    ):
        raise TypeError(
            f"`{name}` must be a list or tuple of positive integers. "
            f"Received: {name}={value!r}"
        )
    return tuple(check_int(f"{name}[{i}]", v, 1) for i, v in enumerate(value))


def to_tensor(name, x):
    """Converts `x` to a dense tensor; a ragged or sparse tensor, or a value
    TensorFlow cannot convert, is an error naming the argument."""
    if isinstance(x, (tf.RaggedTensor, tf.SparseTensor)):
        raise TypeError(
            f"`{name}` must be a dense tensor; ragged and sparse tensors are "
            f"not supported (pad it, e.g. with `.to_tensor()`, and pass a "
            f"mask for the padding where the argument takes one). "
            f"Received: {name} of type {type(x).__name__} with shape "
            f"{x.shape}"
        )
    try:
        return tf.convert_to_tensor(x)
    except (TypeError, ValueError) as error:
        text = repr(x)
        if len(text) > 200:
            text = text[:200] + "..."
        raise type(error)(
            f"`{name}` must be a tensor or a value convertible to one "
            f"({error}). Received: {name}={text}"
        ) from error


def check_float_tensor(name, x):
    """Converts `x` to a tensor and checks that its dtype is floating."""
    x = to_tensor(name, x)
    if not x.dtype.is_floating:
        raise TypeError(
            f"`{name}` must be a floating-point tensor. Received: "
            f"{name}.dtype={x.dtype.name}"
        )
    return x


def check_known_rank(name, x):
    """Raises if `x` is a tensor of unknown rank (a `tf.function` traced
    with `tf.TensorSpec(None)`): layers call it in `__call__`, where Keras
    reads the shape to build the layer before `call` can check it."""
    shape = getattr(x, "shape", None)
    if isinstance(shape, tf.TensorShape) and shape.rank is None:
        raise ValueError(
            f"`{name}` must have a known rank (its last axis holds the "
            f"features). Received: {name}.shape=<unknown rank>"
        )


def check_input_shape(name, shape, min_rank, max_rank=None, width=None):
    """Checks a (possibly partially known) shape: rank and last-axis width."""
    if shape is None or (
        isinstance(shape, tf.TensorShape) and shape.rank is None
    ):
        raise ValueError(
            f"`{name}` must have a known rank (its last axis holds the "
            f"features). Received: {name}.shape=<unknown rank>"
        )
    shape = tuple(shape)
    rank = len(shape)
    if rank < min_rank or (max_rank is not None and rank > max_rank):
        want = (
            f"rank {min_rank}" if max_rank == min_rank
            else f"rank >= {min_rank}"
        )
        raise ValueError(
            f"`{name}` must have {want} (the last axis holds the features). "
            f"Received: {name}.shape={shape}"
        )
    if shape[-1] is None:
        raise ValueError(
            f"The last axis of `{name}` must be known. "
            f"Received: {name}.shape={shape}"
        )
    if width is not None and shape[-1] != width:
        raise ValueError(
            f"The last axis of `{name}` must have size {width}, the size the "
            f"layer was built with. Received: {name}.shape={shape}"
        )


def check_finite(name, x):
    """Raises if `x` holds NaN or infinity.

    Eagerly this is a `ValueError`; inside a graph it is an op that fails
    the step with an `InvalidArgumentError` carrying the same message.
    """
    message = f"`{name}` contains NaN or infinite values."
    if tf.executing_eagerly():
        if not bool(tf.reduce_all(tf.math.is_finite(x))):
            raise ValueError(message + f" Received: {name}={x}")
        return x
    return tf.debugging.assert_all_finite(x, message)


def check_finite_rows(name, values, rows, what):
    """Raises if a row of `values`, computed from the same row of `rows`
    (the argument `name`), holds NaN or infinity: `rows` is finite (checked
    before) but too large for what `values` computes from it. The message
    is `` `name` `` followed by `what`; eagerly it is a `ValueError` that
    shows the first offending row, in a graph an assertion op.
    """
    message = f"`{name}` {what}"
    if tf.executing_eagerly():
        bad = tf.where(~tf.reduce_all(tf.math.is_finite(values), 1))[:, 0]
        if int(tf.size(bad)):
            first = int(bad[0])
            raise ValueError(
                message + f" Received: {int(tf.size(bad))} such row(s), "
                f"the first {name}[{first}]={rows[first].numpy()}"
            )
        return values
    return tf.debugging.assert_all_finite(values, message)


def check_finite_non_negative(name, x):
    """Raises if `x` holds NaN, infinity or a negative value; errors as
    `check_finite`'s."""
    message = f"`{name}` must be finite and >= 0."
    if tf.executing_eagerly():
        if not bool(tf.reduce_all(tf.math.is_finite(x) & (x >= 0))):
            raise ValueError(message + f" Received: {name}={x}")
        return x
    # One check of finiteness (it also compiles with XLA): negative values
    # become NaN first.
    return tf.debugging.assert_all_finite(
        tf.where(x >= 0, x, tf.constant(float("nan"), x.dtype)), message
    )


def check_finite_positive(name, x):
    """Raises if `x` holds NaN, infinity or a value <= 0; errors as
    `check_finite`'s."""
    message = f"`{name}` must be finite and > 0."
    if tf.executing_eagerly():
        if not bool(tf.reduce_all(tf.math.is_finite(x) & (x > 0))):
            raise ValueError(message + f" Received: {name}={x}")
        return x
    return tf.debugging.assert_all_finite(
        tf.where(x > 0, x, tf.constant(float("nan"), x.dtype)), message
    )


def check_part_sizes(part_sizes, num_parts, rows, name="part_sizes",
                     part="expert"):
    """Returns `part_sizes` as an int32 tensor `[num_parts]` of sizes >= 0
    summing to `rows` (a scalar int tensor): static facts are checked now
    (`ValueError`/`TypeError`), the values eagerly or by assertion ops."""
    part_sizes = to_tensor(name, part_sizes)
    if not part_sizes.dtype.is_integer:
        raise TypeError(
            f"`{name}` must be an integer tensor. Received: "
            f"{name}.dtype={part_sizes.dtype.name}"
        )
    if part_sizes.shape.rank != 1 or part_sizes.shape[0] not in (
        None, num_parts
    ):
        raise ValueError(
            f"`{name}` must have shape ({num_parts},), one size per "
            f"{part}. Received: {name}.shape={tuple(part_sizes.shape)}"
        )
    part_sizes = tf.cast(part_sizes, tf.int32)
    message = (
        f"`{name}` must be >= 0 and sum to the number of rows of "
        "`inputs`."
    )
    if tf.executing_eagerly():
        sizes = part_sizes.numpy()
        if sizes.shape[0] != num_parts or (sizes < 0).any() or (
            sizes.sum() != int(rows)
        ):
            raise ValueError(
                message + f" Received: {name}={sizes.tolist()} for "
                f"{int(rows)} rows"
            )
        return part_sizes
    with tf.control_dependencies([
        tf.debugging.assert_equal(tf.size(part_sizes), num_parts,
                                  message=message),
        tf.debugging.assert_non_negative(part_sizes, message=message),
        tf.debugging.assert_equal(tf.reduce_sum(part_sizes), rows,
                                  message=message),
    ]):
        return tf.identity(part_sizes)


def check_leading_shape(name, x, reference, reference_name, trailing=()):
    """Checks that `x.shape == reference.shape[:-1] + trailing`.

    Static dimensions are checked now (`ValueError`); dimensions unknown
    until run time are checked by an assertion op.
    """
    want = tuple(reference.shape[:-1]) + tuple(trailing)
    got = tuple(x.shape)
    message = (
        f"`{name}` must have shape {reference_name}.shape[:-1]"
        + (f" + {tuple(trailing)}" if trailing else "")
        + f" = {want}. Received: {name}.shape={got}"
    )
    if len(got) != len(want) or any(
        a is not None and b is not None and a != b for a, b in zip(got, want)
    ):
        raise ValueError(message)
    if all(d is not None for d in got) and all(d is not None for d in want):
        return x
    want_dynamic = tf.concat(
        [tf.shape(reference)[:-1], tf.constant(trailing, tf.int32)], 0
    )
    with tf.control_dependencies(
        [tf.debugging.assert_equal(tf.shape(x), want_dynamic, message=message)]
    ):
        return tf.identity(x)
