"""keras_moe.heatmap: the labelled PNG heat map of expert load. The map's
cells, found inside the labelled image; the colour bar, from the colour of
0 to the colour of `vmax`; the words and numbers, found where they belong;
the PNG decoded by `tf.io.decode_png`; the matplotlib renderer; and the
argument checks."""

import sys

import numpy as np
import pytest
import tensorflow as tf

from keras_moe import heatmap
from keras_moe.heatmap import save_load_heatmap

COOL, FAIR, WARM = (59, 76, 192), (221, 221, 221), (180, 4, 38)
NUM_EXPERTS, NUM_STEPS = 16, 120


def _load(num_steps=NUM_STEPS, num_experts=NUM_EXPERTS):
    rng = np.random.default_rng(0)
    load = rng.gamma(2.0, size=(num_steps, num_experts))
    load[:, 3] *= 4.0        # expert 3 overloaded
    load[:, num_experts // 2 - 1] = 0.0   # an idle expert
    return load


def _find(image, part):
    """The `(y, x)` positions where `part` lies in `image`, pixel for
    pixel."""
    height, width = part.shape[:2]
    first = np.argwhere(np.all(
        (image == part[0, 0]).reshape(image.shape[:2] + (-1,)), axis=-1))
    return [
        (y, x) for y, x in first
        if y + height <= image.shape[0] and x + width <= image.shape[1]
        and np.array_equal(image[y:y + height, x:x + width], part)
    ]


def _ink(image):
    """True where the image is black (text, tick marks, frames)."""
    return np.all(image.reshape(image.shape[:2] + (-1,)) == 0, axis=-1)


def _find_text(image, text):
    """The positions where `text` is drawn in black on white."""
    mask = heatmap._text_mask(text)
    ink = _ink(image)
    dy, dx = np.argwhere(mask)[0]
    height, width = mask.shape
    return [
        (y - dy, x - dx) for y, x in np.argwhere(ink)
        if 0 <= y - dy and 0 <= x - dx
        and y - dy + height <= ink.shape[0] and x - dx + width <= ink.shape[1]
        and np.array_equal(ink[y - dy:y - dy + height,
                               x - dx:x - dx + width], mask)
    ]


def _runs(flags, min_gap=8):
    """`[(start, stop), ...]` of the runs of True in `flags`, runs fewer
    than `min_gap` apart merged (the glyphs of one number)."""
    runs = []
    for i in np.flatnonzero(flags):
        if runs and i - runs[-1][1] < min_gap:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return [tuple(run) for run in runs]


def _locate_map(image, load, **kwargs):
    """`(top, left, bottom, right)` of the bare map inside `image`."""
    bare = save_load_heatmap(kwargs.pop("path"), load, labels=False,
                             **kwargs)
    hits = _find(image, bare)
    assert len(hits) == 1, f"the map is found {len(hits)} times"
    top, left = hits[0]
    return top, left, top + bare.shape[0], left + bare.shape[1]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    out = tmp_path_factory.mktemp("heatmap")
    load = _load()
    steps = np.arange(1, NUM_STEPS + 1)
    image = save_load_heatmap(out / "load.png", load, steps=steps,
                              titles="moe")
    box = _locate_map(image, load, path=out / "bare.png")
    return {"out": out, "load": load, "image": image, "box": box}


def test_labelled_image_holds_the_framed_map(labelled):
    image, (top, left, bottom, right) = labelled["image"], labelled["box"]
    assert image.dtype == np.uint8 and image.shape[2] == 3
    assert (bottom - top, right - left) == (NUM_EXPERTS * 8, NUM_STEPS * 2)
    # Labels on every side: the map is well inside the image.
    assert top > 20 and left > 40 and image.shape[1] - right > 40
    assert image.shape[0] - bottom > 20
    # A one-pixel black frame around it.
    ink = _ink(image)
    assert ink[top - 1, left - 1:right + 1].all()
    assert ink[bottom, left - 1:right + 1].all()
    assert ink[top - 1:bottom + 1, left - 1].all()
    assert ink[top - 1:bottom + 1, right].all()
    # The page is white.
    assert tuple(image[0, 0]) == (255, 255, 255)
    assert tuple(image[-1, -1]) == (255, 255, 255)


def test_png_round_trips_through_decode_png(labelled):
    data = (labelled["out"] / "load.png").read_bytes()
    decoded = tf.io.decode_png(data).numpy()
    np.testing.assert_array_equal(decoded, labelled["image"])
    image = save_load_heatmap(labelled["out"] / "gray.png", _load(),
                              colormap="gray")
    assert image.ndim == 2
    decoded = tf.io.decode_png(
        (labelled["out"] / "gray.png").read_bytes()).numpy()
    assert decoded.shape == image.shape + (1,)    # 8-bit greyscale
    np.testing.assert_array_equal(decoded[..., 0], image)


def test_colour_bar_goes_from_the_low_to_the_high_colour(labelled):
    image, (top, _, bottom, right) = labelled["image"], labelled["box"]
    # The colour bar is right of the map, as tall as it: its columns are
    # the coolwarm scale, the colour of vmax at the top, of 0 at the bottom.
    columns = [
        x for x in range(right + 1, image.shape[1])
        if tuple(image[top, x]) == WARM and tuple(image[bottom - 1, x]) == COOL
    ]
    assert len(columns) >= 8, "no colour bar right of the map"
    bar = image[top:bottom, columns[0]].astype(int)
    middle = bar[(len(bar) - 1) // 2]
    assert np.abs(middle - FAIR).max() <= 3, middle
    # Top half on the fair-to-warm segment, bottom half on cool-to-fair.
    for row, lower, upper in ((bar[:len(bar) // 2], WARM, FAIR),
                              (bar[len(bar) // 2:], FAIR, COOL)):
        t = np.linspace(0, 1, len(row))[:, None]
        assert np.abs(row - ((1 - t) * lower + t * np.array(upper))).max() \
            <= 4

    gray = save_load_heatmap(labelled["out"] / "gray.png", _load(),
                             colormap="gray")
    top, _, bottom, right = _locate_map(gray, _load(), colormap="gray",
                                        path=labelled["out"] / "bare.png")
    columns = [x for x in range(right + 1, gray.shape[1])
               if gray[top, x] == 255 and gray[bottom - 1, x] == 0]
    assert columns, "no grey colour bar right of the map"
    bar = gray[top:bottom, columns[0]].astype(int)
    assert np.all(np.diff(bar) <= 0) and len(np.unique(bar)) > 50


def test_axis_names_title_and_colour_bar_caption_are_drawn(labelled):
    image, (top, left, bottom, right) = labelled["image"], labelled["box"]
    [(y, x)] = _find_text(image, "expert")      # above the expert numbers
    assert y < top and x + heatmap._text_width("expert") < left
    [(y, x)] = _find_text(image, "step")        # left of the step numbers
    assert y > bottom and x + heatmap._text_width("step") < left
    [(y, x)] = _find_text(image, "moe")         # the title, over the map
    assert y < top and left <= x < right
    [(y, x)] = _find_text(image, "load / mean load")
    assert y < top and x > right
    for text in ("2+", "1"):      # vmax+ and vmax / 2 on the colour bar
        assert [(y, x) for y, x in _find_text(image, text)
                if x > right and top <= y < bottom], text
    assert [(y, x) for y, x in _find_text(image, "0")
            if x > right and top <= y < bottom]


def test_tick_numbers_left_of_and_below_the_map(labelled):
    image, (top, left, bottom, right) = labelled["image"], labelled["box"]
    ink = _ink(image)
    # Experts 0, 5, 10 and 15, each number centred on its row of cells.
    rows = ink[top:bottom, :left - 1].any(axis=1)
    centres = [(start + stop) / 2 for start, stop in _runs(rows)]
    np.testing.assert_allclose(centres, [e * 8 + 4 for e in (0, 5, 10, 15)],
                               atol=1.5)
    for expert in (0, 5, 10, 15):
        assert any(top <= y < bottom and x < left for y, x in
                   _find_text(image, str(expert))), expert
    # Steps 1, 50 and 100 below their columns (120, the last, is too close
    # to 100 for its number to fit).
    below = ink[bottom + 2 + heatmap._TICK:, left:right + 40].any(axis=0)
    centres = [left + (start + stop) / 2 for start, stop in _runs(below)]
    expected = [left + 2 * (step - 1) + 1 for step in (1, 50, 100)]
    assert len(centres) == 3, centres
    # The first number starts at the map's left edge; the others centred.
    np.testing.assert_allclose(centres[1:], expected[1:], atol=1.5)
    for step in (1, 50, 100):
        assert any(y > bottom for y, _ in _find_text(image, str(step))), step
    assert not any(y > bottom for y, _ in _find_text(image, "120"))
    # Each tick has its mark, outside the frame.
    for x in expected:
        assert ink[bottom + 1:bottom + 1 + heatmap._TICK, x].all()
        assert not ink[bottom + 1 + heatmap._TICK, x]


def test_averaged_columns_are_labelled_with_their_last_step(tmp_path):
    load = _load(10, 4)
    image = save_load_heatmap(tmp_path / "avg.png", load, max_steps=5,
                              cell_size=(8, 40), steps=np.arange(1, 11))
    top, left, bottom, right = _locate_map(
        image, load, max_steps=5, cell_size=(8, 40), path=tmp_path / "b.png")
    assert right - left == 5 * 40
    # 2 steps a column: columns 0, 2 and 4 (steps 2, 6 and 10) labelled.
    for column, step in ((0, 2), (2, 6), (4, 10)):
        [(y, x)] = [(y, x) for y, x in _find_text(image, str(step))
                    if y > bottom and x < right]
        centre = left + 40 * column + 20
        assert abs(x + heatmap._text_width(str(step)) / 2 - centre) <= 1


def test_stacked_layers_each_under_its_title(tmp_path):
    a, b = _load(30, 6), _load(30, 4)
    image = save_load_heatmap(tmp_path / "two.png", [a, b],
                              titles=["first", "second"])
    for load, title in ((a, "first"), (b, "second")):
        bare = save_load_heatmap(tmp_path / "bare.png", load, labels=False)
        [(top, left)] = _find(image, bare)
        [(y, x)] = _find_text(image, title)
        assert top - 3 * heatmap._TEXT_HEIGHT < y < top
    # The second map is below the first.
    assert _find_text(image, "second")[0][0] > _find_text(image, "first")[0][0]


def test_labels_false_is_the_bare_map(tmp_path):
    load = [[2.0, 2.0], [4.0, 0.0]]
    image = save_load_heatmap(tmp_path / "bare.png", load, colormap="gray",
                              cell_size=(1, 1), labels=False)
    np.testing.assert_array_equal(image, [[128, 255], [128, 0]])
    decoded = tf.io.decode_png((tmp_path / "bare.png").read_bytes()).numpy()
    np.testing.assert_array_equal(decoded[..., 0], image)


def test_matplotlib_renderer(tmp_path):
    pytest.importorskip("matplotlib")
    load = _load()
    steps = np.arange(1, NUM_STEPS + 1)
    levels = [np.minimum(load / load.mean(1, keepdims=True) / 2.0, 1.0).T]
    figure = heatmap._matplotlib_figure(levels, steps, ["moe"], 2.0,
                                        "coolwarm", (8, 2))
    ax, colorbar = figure.axes
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == (
        "step", "expert", "moe")
    assert colorbar.get_ylabel() == "load / mean load"
    assert colorbar.get_ylim() == (0.0, 2.0)
    assert [t.get_text() for t in ax.get_xticklabels()][0] == "1"
    image = save_load_heatmap(tmp_path / "mpl.png", load, steps=steps,
                              titles="moe", renderer="matplotlib")
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert image.shape[0] > NUM_EXPERTS * 8 and image.shape[1] > NUM_STEPS * 2
    decoded = tf.io.decode_png((tmp_path / "mpl.png").read_bytes()).numpy()
    np.testing.assert_array_equal(decoded, image)
    # The cells' colours and dark text are in the picture.
    pixels = image.reshape(-1, 3).astype(int)
    for colour in (WARM, COOL):
        assert (np.abs(pixels - colour).max(axis=1) <= 2).sum() > 100
    assert (pixels.max(axis=1) < 40).sum() > 100
    gray = save_load_heatmap(tmp_path / "mpl_gray.png", load,
                             colormap="gray", renderer="matplotlib")
    assert gray.ndim == 2


def test_matplotlib_renderer_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match="needs matplotlib"):
        save_load_heatmap(tmp_path / "x.png", _load(), renderer="matplotlib")
    # The built-in renderer needs nothing.
    save_load_heatmap(tmp_path / "x.png", _load())
    assert (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"path": 3}, TypeError, "Received: path=3"),
        ({"path": ""}, ValueError, "Received: path=''"),
        ({"vmax": 0}, ValueError, "Received: vmax=0"),
        ({"vmax": float("inf")}, ValueError, "Received: vmax=inf"),
        ({"vmax": "2"}, TypeError, "Received: vmax='2'"),
        ({"colormap": "jet"}, ValueError, "Received: colormap='jet'"),
        ({"colormap": None}, TypeError, "Received: colormap=None"),
        ({"cell_size": (0, 1)}, ValueError, r"Received: cell_size\[0\]=0"),
        ({"cell_size": (1, 2, 3)}, ValueError, r"cell_size=\(1, 2, 3\)"),
        ({"cell_size": 8}, TypeError, "Received: cell_size=8"),
        ({"cell_size": (8, 2.5)}, TypeError, r"cell_size\[1\]=2.5"),
        ({"max_steps": 0}, ValueError, "Received: max_steps=0"),
        ({"max_steps": 1.5}, TypeError, "Received: max_steps=1.5"),
        ({"labels": "yes"}, TypeError, "Received: labels='yes'"),
        ({"steps": [1.0, 2.0]}, TypeError, "Received: steps="),
        ({"steps": [1, 2, 3]}, ValueError, r"steps.shape=\(3,\)"),
        ({"titles": [1]}, TypeError, r"Received: titles=\[1\]"),
        ({"titles": ["a", "b"]}, ValueError, "Received: titles="),
        ({"renderer": "pillow"}, ValueError, "Received: renderer='pillow'"),
        ({"load": [[1.0, -1.0], [1.0, 1.0]]}, ValueError,
         "finite loads >= 0"),
        ({"load": [1.0, 2.0]}, ValueError, r"load.shape=\(2,\)"),
        ({"load": [[["a"]]]}, TypeError, "Received: load="),
        ({"load": [np.ones((2, 3)), np.ones((3, 3))]}, ValueError,
         "same number of steps"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, error, match):
    arguments = {"path": tmp_path / "x.png", "load": [[1.0, 2.0], [3.0, 4.0]]}
    arguments.update(kwargs)
    with pytest.raises(error, match=match):
        save_load_heatmap(**arguments)
    assert not (tmp_path / "x.png").exists()
