"""Heat maps of expert load over training steps, written as labelled PNG
images: the experts down, the steps across, a colour bar on the right.

The labels are drawn with a small built-in bitmap font (no plotting library
needed), or with matplotlib where it is installed and asked for
(`renderer="matplotlib"`); the PNG is encoded by `tf.io.encode_png`.
"""

import os

import numpy as np
import tensorflow as tf

from keras_moe import validation

# The "coolwarm" heat map: blue (idle) -> light grey (fair share) -> red
# (overloaded), linear in RGB between these anchors at 0, 0.5 and 1.
_COOLWARM = np.array(
    [[59, 76, 192], [221, 221, 221], [180, 4, 38]], dtype=np.float64
)
_COLORMAPS = ("coolwarm", "gray")
_RENDERERS = ("builtin", "matplotlib")
# Between layers stacked in an unlabelled heat map: this many rows of black
# pixels.
SEPARATOR_HEIGHT = 2

# A 5 x 7 pixel font: per character, 7 rows of 5 bits (the high bit on the
# left) as 14 hex digits. Lower-case letters are drawn as capitals, other
# characters as "?".
_FONT = {
    "0": "0e11131519110e", "1": "040c040404040e", "2": "0e11010204081f",
    "3": "1f02040201110e", "4": "02060a121f0202", "5": "1f101e0101110e",
    "6": "0608101e11110e", "7": "1f010204080808", "8": "0e11110e11110e",
    "9": "0e11110f01020c", "A": "0e11111f111111", "B": "1e11111e11111e",
    "C": "0e11101010110e", "D": "1c12111111121c", "E": "1f10101e10101f",
    "F": "1f10101e101010", "G": "0e11101711110f", "H": "1111111f111111",
    "I": "0e04040404040e", "J": "0702020202120c", "K": "11121418141211",
    "L": "1010101010101f", "M": "111b1515111111", "N": "11111915131111",
    "O": "0e11111111110e", "P": "1e11111e101010", "Q": "0e11111115120d",
    "R": "1e11111e141211", "S": "0f10100e01011e", "T": "1f040404040404",
    "U": "1111111111110e", "V": "11111111110a04", "W": "1111111515150a",
    "X": "11110a040a1111", "Y": "1111110a040404", "Z": "1f01020408101f",
    " ": "00000000000000", ".": "00000000000c0c", "-": "0000001f000000",
    "+": "0004041f040400", "_": "0000000000001f", "/": "00010204081000",
    ":": "000c0c000c0c00", "?": "0e110102040004",
}
# Each font pixel is drawn as _SCALE x _SCALE image pixels.
_SCALE = 2
_TEXT_HEIGHT = 7 * _SCALE
_ADVANCE = 6 * _SCALE      # a glyph and the blank column after it
_GAP = 2 * _SCALE
_MARGIN = 4 * _SCALE
_TICK = 2 * _SCALE         # length of a tick mark
_BAR_WIDTH = 6 * _SCALE    # of the colour bar
_INK, _PAPER = 0, 255
# The texts that name the axes and the colour bar.
EXPERT_LABEL, STEP_LABEL = "expert", "step"
SCALE_LABEL = "load / mean load"


def save_load_heatmap(
    path, load, vmax=2.0, colormap="coolwarm", cell_size=(8, 2),
    max_steps=None, labels=True, steps=None, titles=None,
    renderer="builtin",
):
    """Writes a PNG heat map of expert load over steps.

    Each cell shows one expert at one step: its load divided by the mean
    load of all experts at that step (1.0 is a fair share; 0 for a step
    with no load at all), scaled by `vmax` and clipped to `[0, 1]`:
    `v = min(load / mean_load / vmax, 1)`. With the default `vmax=2`,
    `v = 0.5` is a fair share. `v` is drawn with `colormap`:

    - `"coolwarm"`: blue `(59, 76, 192)` at 0 (idle), light grey
      `(221, 221, 221)` at 0.5, red `(180, 4, 38)` at 1 (overloaded),
      linear in RGB in between, rounded to the nearest integer;
    - `"gray"`: `round(255 * v)`, black = idle, white = overloaded.

    The map has one row of `cell_size[0]` pixels per expert (expert 0 at
    the top) and one column of `cell_size[1]` pixels per step (the first
    step on the left). Given several load matrices (one per layer, with the
    same number of steps), their maps are stacked top to bottom.

    With `labels=True` (the default) the map is framed in black on a white
    page and labelled: the heading `EXPERT` over the expert numbers on the
    left, `STEP` and the step numbers below (a few of each, at tick marks),
    `titles` above the maps, and on the right a colour bar from the
    colour of 0 (bottom) to that of `vmax` (top) under the heading
    `LOAD / MEAN LOAD`, with the numbers 0, `vmax / 2` (where there is
    room) and `vmax+` (the top colour stands for `vmax` and more). The
    built-in renderer draws the text with a 5 x 7 pixel font at twice its
    size (capital letters, digits and `. - + _ / :`; lower case as capitals,
    anything else as `?`), and the map's cells keep their exact colours and
    `cell_size`; `renderer="matplotlib"` draws the same with matplotlib
    (installed with the `examples` extra) and its fonts, at whatever size
    it lays the figure out.

    With `labels=False` the image is the bare map: `width = steps *
    cell_size[1]`, `height = num_experts * cell_size[0]`, several maps
    `SEPARATOR_HEIGHT` (2) rows of black pixels apart.

    The PNG is 8-bit RGB (greyscale with `"gray"`), encoded by
    `tf.io.encode_png`.

    Args:
        path: the PNG file to write (str or path-like); its directory is
            created if needed.
        load: array-like `[steps, num_experts]` of non-negative loads, or a
            list of such arrays with the same number of steps.
        vmax: float > 0, the relative load drawn at the top of the scale.
        colormap: `"coolwarm"` or `"gray"`.
        cell_size: `(height, width)` in pixels of one cell, ints >= 1.
        max_steps: optional int >= 1. With more steps than this, consecutive
            steps are averaged (relative loads, in `max_steps` nearly equal
            runs of steps, as `numpy.array_split` makes them) so the map is at
            most `max_steps` cells wide; a column's step number is then the
            last step of its run.
        labels: bool; draw the axes' names, tick numbers, titles and the
            colour bar around the map.
        steps: optional 1-D integer array-like, the step number of each
            row of `load` (the labels of the step axis); default
            `0, 1, ..., steps - 1`.
        titles: optional str or list of str, one per load matrix, drawn
            above its map (e.g. the layer names).
        renderer: `"builtin"` (the default: the bitmap font, no plotting
            library needed, the same pixels everywhere) or `"matplotlib"`.

    Returns:
        The image as a uint8 array `(height, width, 3)` (`(height, width)`
        with `"gray"`).

    Raises:
        TypeError: for an argument of the wrong type.
        ValueError: for an argument of the right type with a bad value.
        ImportError: with `renderer="matplotlib"`, if matplotlib is not
            installed.

    Example:

    >>> import os, tempfile
    >>> out = tempfile.mkdtemp()
    >>> load = [[2.0, 2.0], [4.0, 0.0]]     # 2 steps x 2 experts
    >>> image = save_load_heatmap(os.path.join(out, "bare.png"), load,
    ...                           colormap="gray", cell_size=(1, 1),
    ...                           labels=False)
    >>> image.tolist()        # rows: experts; columns: steps
    [[128, 255], [128, 0]]
    >>> image = save_load_heatmap(os.path.join(out, "load.png"), load,
    ...                           cell_size=(40, 60))
    >>> image.shape           # the 80 x 120 map, framed and labelled
    (138, 420, 3)
    """
    matrices = _check_load(load)
    vmax = validation.check_positive_float("vmax", vmax)
    colormap = _check_choice("colormap", colormap, _COLORMAPS)
    cell_size = _check_cell_size(cell_size)
    if max_steps is not None:
        max_steps = validation.check_int("max_steps", max_steps, 1)
    labels = validation.check_bool("labels", _as_bool(labels))
    num_steps = matrices[0].shape[0]
    steps = _check_steps(steps, num_steps)
    titles = _check_titles(titles, len(matrices))
    renderer = _check_choice("renderer", renderer, _RENDERERS)
    path = os.fspath(_check_path("path", path, required=True))

    levels = []
    for matrix in matrices:
        mean = matrix.mean(axis=1, keepdims=True)
        relative = np.divide(matrix, mean, out=np.zeros_like(matrix),
                             where=mean > 0)
        if max_steps is not None and num_steps > max_steps:
            relative = np.stack(
                [chunk.mean(axis=0)
                 for chunk in np.array_split(relative, max_steps)]
            )
        levels.append(np.minimum(relative / vmax, 1.0).T)  # [experts, steps]
    if max_steps is not None and num_steps > max_steps:
        steps = [chunk[-1] for chunk in np.array_split(steps, max_steps)]

    if not labels:
        image = _bare_map(levels, colormap, cell_size)
    elif renderer == "matplotlib":
        figure = _matplotlib_figure(levels, steps, titles, vmax, colormap,
                                    cell_size)
        image = _figure_pixels(figure, colormap)
    else:
        image = _labelled_map(levels, steps, titles, vmax, colormap,
                              cell_size)
    directory = os.path.dirname(path)
    if directory:
        tf.io.gfile.makedirs(directory)
    with tf.io.gfile.GFile(path, "wb") as f:
        f.write(_encode_png(image))
    return image


def _encode_png(pixels):
    """PNG bytes of a uint8 `[h, w]` (greyscale) or `[h, w, 3]` image."""
    pixels = np.asarray(pixels)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    return tf.io.encode_png(pixels).numpy()


def _colorize(level, colormap):
    """uint8 pixels for levels in [0, 1]: `[h, w]` gray or `[h, w, 3]`."""
    if colormap == "gray":
        return np.round(255.0 * level).astype(np.uint8)
    # Piecewise linear between the anchors at 0, 0.5 and 1.
    position = level * (len(_COOLWARM) - 1)
    lower = np.minimum(np.floor(position).astype(int), len(_COOLWARM) - 2)
    fraction = (position - lower)[..., None]
    rgb = (_COOLWARM[lower] * (1.0 - fraction)
           + _COOLWARM[lower + 1] * fraction)
    return np.round(rgb).astype(np.uint8)


def _cells(level, colormap, cell_size):
    """The colours of `level` `[experts, steps]`, each a cell of pixels."""
    pixels = _colorize(level, colormap)
    return np.repeat(np.repeat(pixels, cell_size[0], axis=0), cell_size[1],
                     axis=1)


def _bare_map(levels, colormap, cell_size):
    blocks = []
    for i, level in enumerate(levels):
        pixels = _cells(level, colormap, cell_size)
        if i:
            blocks.append(np.zeros((SEPARATOR_HEIGHT,) + pixels.shape[1:],
                                   np.uint8))
        blocks.append(pixels)
    return np.concatenate(blocks, axis=0)


# The built-in renderer.


def _text_mask(text):
    """The pixels of `text` in the bitmap font: bool `[height, width]`."""
    text = text.upper()
    mask = np.zeros((7, max(6 * len(text) - 1, 0)), bool)
    for i, char in enumerate(text):
        rows = bytes.fromhex(_FONT.get(char, _FONT["?"]))
        bits = np.unpackbits(np.frombuffer(rows, np.uint8)[:, None], axis=1)
        mask[:, 6 * i:6 * i + 5] = bits[:, 3:].astype(bool)
    return np.kron(mask, np.ones((_SCALE, _SCALE), bool)).astype(bool)


def _text_width(text):
    return max(_ADVANCE * len(text) - _SCALE, 0)


def _draw_text(image, text, x, y):
    """Draws `text` with its top left corner at `(x, y)`."""
    mask = _text_mask(text)
    height, width = mask.shape
    image[y:y + height, x:x + width][mask] = _INK


def _nice_stride(minimum):
    """The smallest of 1, 2, 5, 10, 20, 50, ... that is >= `minimum`."""
    stride = 1
    while stride < minimum:
        for factor in (2, 5, 10):
            if stride * factor >= minimum:
                return stride * factor
        stride *= 10
    return stride


def _ticks(values, cell, spacing):
    """The indices of a few ticks along an axis of `len(values)` cells of
    `cell` pixels, labelled `values` (increasing ints): where the values
    cross multiples of a round stride, the first and last index where they
    fit, at least `spacing` pixels apart."""
    count = len(values)
    per_index = (values[-1] - values[0]) / (count - 1) if count > 1 else 1
    stride = _nice_stride(max(spacing / cell * per_index, 1))
    crossings = [
        i for i in range(count)
        if values[i] % stride == 0
        or (i and values[i] // stride > values[i - 1] // stride)
    ]
    picked = []
    for i in [0] + crossings + [count - 1]:
        if not picked or (i - picked[-1]) * cell >= spacing:
            picked.append(i)
    return picked


def _label(value):
    return f"{value:g}" if isinstance(value, float) else str(int(value))


def _labelled_map(levels, steps, titles, vmax, colormap, cell_size):
    cell_height, cell_width = cell_size
    num_columns = levels[0].shape[1]
    map_width = num_columns * cell_width
    step_labels = [_label(step) for step in steps]
    label_width = max(_text_width(text) for text in step_labels)
    step_ticks = _ticks([int(step) for step in steps], cell_width,
                        1.5 * label_width + _ADVANCE)
    expert_ticks = [
        _ticks(range(level.shape[0]), cell_height, _TEXT_HEIGHT + _GAP)
        for level in levels
    ]
    left = max(
        [_text_width(EXPERT_LABEL), _text_width(STEP_LABEL)]
        + [_text_width(str(level.shape[0] - 1)) for level in levels]
    ) + _GAP + _TICK
    x0 = _MARGIN + left + 1     # the map's first column, inside the frame
    # Vertical positions: the headings, then each block's title and map.
    y = _MARGIN + _TEXT_HEIGHT + _GAP
    tops = []
    for i, level in enumerate(levels):
        if titles is not None and i:
            y += _TEXT_HEIGHT + _GAP
        tops.append(y + 1)
        y += level.shape[0] * cell_height + 2 + _GAP
    top, bottom = tops[0], tops[-1] + levels[-1].shape[0] * cell_height
    # The colour bar, right of the maps and of the titles.
    title_width = max(_text_width(t) for t in titles) if titles else 0
    bar_x = 1 + max(
        x0 + map_width + 1 + max(3 * _GAP, label_width // 2 + 2 * _GAP),
        x0 + 3 * _ADVANCE + title_width,
    )
    bar_height = max(bottom - top, 2 * _TEXT_HEIGHT + _GAP)
    bar_values = [(0.0, bar_height - 1, "0")]
    if bar_height >= 3 * _TEXT_HEIGHT + 2 * _GAP:
        bar_values.append((0.5, (bar_height - 1) // 2, _label(vmax / 2)))
    bar_values.append((1.0, 0, _label(vmax) + "+"))
    bar_labels_x = bar_x + _BAR_WIDTH + 1 + _TICK + _GAP
    steps_y = bottom + 1 + _TICK + _GAP
    width = _MARGIN + max(
        bar_labels_x + max(_text_width(t) for _, _, t in bar_values),
        bar_x + _text_width(SCALE_LABEL),
        x0 + map_width + label_width,
    )
    height = max(steps_y + _TEXT_HEIGHT, top + bar_height + 1) + _MARGIN

    channels = () if colormap == "gray" else (3,)
    image = np.full((height, width) + channels, _PAPER, np.uint8)
    _draw_text(image, EXPERT_LABEL, x0 - 1 - _TICK - _GAP
               - _text_width(EXPERT_LABEL), _MARGIN)
    _draw_text(image, SCALE_LABEL, bar_x, _MARGIN)
    for i, (level, y) in enumerate(zip(levels, tops)):
        if titles is not None:   # centred over the map, apart from EXPERT
            title_x = max(x0 + (map_width - _text_width(titles[i])) // 2,
                          x0 + _ADVANCE)
            _draw_text(image, titles[i], title_x,
                       y - 1 - _GAP - _TEXT_HEIGHT)
        pixels = _cells(level, colormap, cell_size)
        _frame(image, pixels, x0, y)
        for expert in expert_ticks[i]:
            centre = y + expert * cell_height + cell_height // 2
            image[centre, x0 - 1 - _TICK:x0 - 1] = _INK
            text = str(expert)
            _draw_text(image, text,
                       x0 - 1 - _TICK - _GAP - _text_width(text),
                       centre - _TEXT_HEIGHT // 2)
    _draw_text(image, STEP_LABEL, x0 - 1 - _TICK - _GAP
               - _text_width(STEP_LABEL), steps_y)
    for column in step_ticks:
        centre = x0 + column * cell_width + cell_width // 2
        image[bottom + 1:bottom + 1 + _TICK, centre] = _INK
        text = step_labels[column]
        _draw_text(image, text,
                   max(centre - _text_width(text) // 2, x0 - 1), steps_y)
    # The colour bar: the colour of 1 at the top row, of 0 at the bottom.
    ramp = np.linspace(1.0, 0.0, bar_height)[:, None]
    bar = _colorize(np.repeat(ramp, _BAR_WIDTH, axis=1), colormap)
    _frame(image, bar, bar_x, top)
    for _, row, text in bar_values:
        image[top + row, bar_x + _BAR_WIDTH + 1:bar_labels_x - _GAP] = _INK
        text_y = top + row - _TEXT_HEIGHT // 2
        text_y = min(max(text_y, top), top + bar_height - _TEXT_HEIGHT)
        _draw_text(image, text, bar_labels_x, text_y)
    return image


def _frame(image, pixels, x, y):
    """Puts `pixels` at `(x, y)` inside a one-pixel black frame."""
    height, width = pixels.shape[:2]
    image[y - 1:y + height + 1, x - 1:x + width + 1] = _INK
    image[y:y + height, x:x + width] = pixels


# The matplotlib renderer.


def _matplotlib_figure(levels, steps, titles, vmax, colormap, cell_size):
    """A matplotlib `Figure` (no pyplot state) of the labelled heat map."""
    try:
        from matplotlib import colors
        from matplotlib.cm import ScalarMappable
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            "`renderer='matplotlib'` needs matplotlib (`pip install "
            "keras_moe[examples]` or `pip install matplotlib`); "
            "`renderer='builtin'` needs nothing."
        ) from error
    dpi = 100
    map_width = levels[0].shape[1] * cell_size[1]
    heights = [max(level.shape[0] * cell_size[0], 60) for level in levels]
    figure = Figure(
        figsize=((max(map_width, 240) + 200) / dpi,
                 (sum(heights) + 50 * len(levels) + 60) / dpi),
        dpi=dpi, layout="constrained",
    )
    axes = figure.subplots(len(levels), 1, squeeze=False,
                           gridspec_kw={"height_ratios": heights})[:, 0]
    ramp = _colorize(np.linspace(0.0, 1.0, 256), colormap)
    if colormap == "gray":
        ramp = np.repeat(ramp[:, None], 3, axis=1)
    cmap = colors.ListedColormap(ramp / 255.0)
    cmap = cmap.with_extremes(over=ramp[-1] / 255.0)
    # The ticks the built-in renderer would choose for axes this long.
    step_ticks = _ticks([int(step) for step in steps],
                        max(map_width, 240) / len(steps), 60)
    for i, (ax, level, height) in enumerate(zip(axes, levels, heights)):
        ax.imshow(level * vmax, cmap=cmap, vmin=0.0, vmax=vmax,
                  aspect="auto", interpolation="nearest")
        ax.set_ylabel(EXPERT_LABEL)
        ax.set_yticks(_ticks(range(level.shape[0]), height / level.shape[0],
                             16))
        ax.set_xticks(step_ticks, [_label(steps[c]) for c in step_ticks])
        if titles is not None:
            ax.set_title(titles[i])
    axes[-1].set_xlabel(STEP_LABEL)
    figure.colorbar(
        ScalarMappable(colors.Normalize(0.0, vmax), cmap),
        ax=list(axes), label=SCALE_LABEL, extend="max",
    )
    return figure


def _figure_pixels(figure, colormap):
    """The rendered figure as uint8 RGB (one channel for `"gray"`)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    rgb = np.array(canvas.buffer_rgba())[..., :3]
    return rgb[..., 0].copy() if colormap == "gray" else rgb


# Argument checks.


def _check_load(load):
    if isinstance(load, (list, tuple)) and load and np.ndim(load[0]) == 2:
        matrices = list(load)  # one matrix per layer
    else:
        matrices = [load]
    result = []
    for index, matrix in enumerate(matrices):
        name = "load" if len(matrices) == 1 else f"load[{index}]"
        try:
            matrix = np.asarray(matrix, dtype=np.float64)
        except (TypeError, ValueError) as error:
            raise TypeError(
                f"`{name}` must be an array-like of numbers ({error}). "
                f"Received: {name}={matrix!r}"
            ) from error
        if matrix.ndim != 2 or matrix.shape[0] < 1 or matrix.shape[1] < 1:
            raise ValueError(
                f"`{name}` must be a non-empty 2-D array [steps, "
                f"num_experts]. Received: {name}.shape={matrix.shape}"
            )
        if not np.all(np.isfinite(matrix)) or np.any(matrix < 0):
            raise ValueError(
                f"`{name}` must hold finite loads >= 0. Received: {name} "
                f"with min {np.min(matrix)}, max {np.max(matrix)}"
            )
        if matrix.shape[0] != np.shape(result[0] if result else matrix)[0]:
            raise ValueError(
                "All load matrices must have the same number of steps. "
                f"Received: load with steps "
                f"{[np.shape(m)[0] for m in matrices]}"
            )
        result.append(matrix)
    return result


def _check_choice(name, value, choices):
    if not isinstance(value, str):
        raise TypeError(
            f"`{name}` must be a str, one of {choices}. Received: "
            f"{name}={value!r}"
        )
    if value not in choices:
        raise ValueError(
            f"`{name}` must be one of {choices}. Received: {name}={value!r}"
        )
    return value


def _check_cell_size(cell_size):
    sizes = validation.check_sizes("cell_size", cell_size)
    if len(sizes) != 2:
        raise ValueError(
            "`cell_size` must be a pair of ints >= 1, (height, width) in "
            f"pixels. Received: cell_size={cell_size!r}"
        )
    return sizes


def _check_steps(steps, num_steps):
    if steps is None:
        return np.arange(num_steps)
    array = np.asarray(steps)
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(
            "`steps` must be integers, the step number of each row of "
            f"`load`. Received: steps={steps!r}"
        )
    if array.shape != (num_steps,):
        raise ValueError(
            f"`steps` must be 1-D with one step number per row of `load` "
            f"({num_steps}). Received: steps.shape={array.shape}"
        )
    return array


def _check_titles(titles, count):
    if titles is None:
        return None
    if isinstance(titles, str):
        titles = [titles]
    if not isinstance(titles, (list, tuple)) or not all(
        isinstance(title, str) for title in titles
    ):
        raise TypeError(
            "`titles` must be a str or a list of str, one per load matrix. "
            f"Received: titles={titles!r}"
        )
    if len(titles) != count:
        raise ValueError(
            f"`titles` must hold one title per load matrix ({count}). "
            f"Received: titles={titles!r}"
        )
    return list(titles)


def _check_path(name, value, required=False):
    """Returns `value`, a non-empty str or path-like (or None unless
    `required`)."""
    if value is None and not required:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(
            f"`{name}` must be a path (str or path-like)"
            + ("" if required else " or None")
            + f". Received: {name}={value!r}"
        )
    if not os.fspath(value):
        raise ValueError(
            f"`{name}` must be a non-empty path. Received: {name}={value!r}"
        )
    return value


def _as_bool(value):
    """`bool(value)` for a numpy bool, else `value` unchanged."""
    return bool(value) if isinstance(value, np.bool_) else value
