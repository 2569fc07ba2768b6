"""Keras callbacks that show how a model's MoE layers route its tokens:
per-expert load and importance in TensorBoard, and a heat map of expert load
over training."""

import math
import os
import struct
import zlib

import keras
import numpy as np
import tensorflow as tf

from keras_moe.moe import HierarchicalMixtureOfExperts, MixtureOfExperts

_MOE_CLASSES = (MixtureOfExperts, HierarchicalMixtureOfExperts)

# The "coolwarm" heat map: blue (idle) -> light grey (fair share) -> red
# (overloaded), linear in RGB between these anchors at 0, 0.5 and 1.
_COOLWARM = np.array(
    [[59, 76, 192], [221, 221, 221], [180, 4, 38]], dtype=np.float64
)
_COLORMAPS = ("coolwarm", "gray")
# Between layers stacked in one heat map: this many rows of black pixels.
SEPARATOR_HEIGHT = 2


class RoutingMonitor(keras.callbacks.Callback):
    """Logs each MoE layer's per-expert load and importance while training.

    Every `update_freq` training batches the callback reads the
    `last_load` and `last_importance` of each `MixtureOfExperts` and
    `HierarchicalMixtureOfExperts` layer of the model (built with
    `routing_metrics=True`, the default): the load and importance of the
    batch just trained on, global under `tf.distribute` (with
    `cross_replica_balance=True`). It

    - writes them to TensorBoard as histograms over the experts, tagged
      `{layer name}/load` and `{layer name}/importance` (with
      `per_expert_scalars=True`, also one scalar per expert,
      `{layer name}/load/expert_{i}` and `.../importance/expert_{i}`), at
      step `model.optimizer.iterations` (the number of optimizer updates
      so far: 1 after the first batch);
    - keeps them in `history`;
    - at the end of training, if `heatmap_path` is set, draws a PNG heat map
      of expert load over training (`save_heatmap`): one row per expert,
      one column per recorded step.

    The histograms are TensorFlow's classic histogram summaries (the ones
    the original `expert_utils.py` wrote with `summaries=True`); they need
    no TensorBoard installation to write, and TensorBoard shows them in its
    Histograms and Distributions tabs. Per-expert values of a hierarchical
    layer are flattened: expert `j` of group `i` is expert
    `i * experts_per_group + j`, as in its routing report.

    The history grows by one row per recorded step and MoE layer (4 bytes
    per expert each, for load and for importance); raise `update_freq` for
    very long runs. It carries over from one `fit` to the next (the steps
    continue), and is cleared when the callback is given another model.

    Args:
        log_dir: optional directory (str or path-like) for the TensorBoard
            event files. None writes no summaries. To see them next to
            `keras.callbacks.TensorBoard(log_dir="logs")`'s runs, pass
            e.g. `"logs/routing"`.
        heatmap_path: optional path of a PNG file written at the end of
            training with `save_heatmap` (defaults). None writes none; you
            can still call `save_heatmap` yourself.
        layers: optional list of MoE layers, or of their names, to monitor.
            None (the default) monitors every MoE layer of the model, at
            any depth, that has `routing_metrics=True`.
        update_freq: int >= 1: record every `update_freq` training
            batches (every `update_freq` calls of `on_train_batch_end`:
            with `steps_per_execution > 1` Keras calls it once per
            execution, and the values are the execution's last batch's).
        per_expert_scalars: bool; also write one scalar summary per expert.

    Attributes:
        history: dict from layer name to a dict with `"step"` (int64
            `[records]`, the optimizer iterations), `"load"` and
            `"importance"` (float32 `[records, num_experts]`).

    Raises:
        ValueError: at construction, for a bad argument; when training
            begins, if the model has no MoE layer to monitor, or `layers`
            names a layer that is not in the model, is not an MoE layer, or
            was built with `routing_metrics=False`.

    Example:

    >>> import os, tempfile
    >>> import keras_moe
    >>> inputs = keras.Input((8,))
    >>> h = keras_moe.MixtureOfExperts(num_experts=4, k=2, name="moe")(inputs)
    >>> model = keras.Model(inputs, keras.layers.Dense(1)(h))
    >>> model.compile("adam", "mse")
    >>> out = tempfile.mkdtemp()
    >>> monitor = keras_moe.callbacks.RoutingMonitor(
    ...     log_dir=os.path.join(out, "routing"),
    ...     heatmap_path=os.path.join(out, "load.png"))
    >>> x = np.random.rand(64, 8).astype("float32")
    >>> _ = model.fit(x, x[:, :1], batch_size=16, epochs=2, verbose=0,
    ...               callbacks=[monitor])
    >>> monitor.history["moe"]["step"]
    array([1, 2, 3, 4, 5, 6, 7, 8])
    >>> monitor.history["moe"]["load"].shape
    (8, 4)
    >>> os.path.exists(os.path.join(out, "load.png"))
    True
    """

    def __init__(
        self,
        log_dir=None,
        heatmap_path=None,
        layers=None,
        update_freq=1,
        per_expert_scalars=False,
    ):
        super().__init__()
        self.log_dir = _check_path("log_dir", log_dir)
        self.heatmap_path = _check_path("heatmap_path", heatmap_path)
        if isinstance(update_freq, bool) or not isinstance(
            update_freq, (int, np.integer)
        ) or update_freq < 1:
            raise ValueError(
                "`update_freq` must be an int >= 1 (record every "
                f"`update_freq` training batches). Received: "
                f"update_freq={update_freq!r}"
            )
        self.update_freq = int(update_freq)
        if not isinstance(per_expert_scalars, (bool, np.bool_)):
            raise ValueError(
                "`per_expert_scalars` must be a bool. Received: "
                f"per_expert_scalars={per_expert_scalars!r}"
            )
        self.per_expert_scalars = bool(per_expert_scalars)
        if layers is not None:
            if isinstance(layers, (str, keras.layers.Layer)):
                layers = [layers]
            layers = list(layers)
            if not layers:
                raise ValueError(
                    "`layers` must name at least one MoE layer, or be None "
                    "for all of them. Received: layers=[]"
                )
            for item in layers:
                if not isinstance(item, (str, keras.layers.Layer)):
                    raise ValueError(
                        "`layers` must be a list of MoE layers or layer "
                        f"names. Received an item {item!r} of type "
                        f"{type(item).__name__}"
                    )
        self.layers = layers
        self._monitored = None
        self._writer = None
        self._batches = 0
        self._records = {}
        self._history_model = None

    def set_model(self, model):
        super().set_model(model)
        if self._history_model is not model:
            self._history_model = model
            self._records = {}
            self._monitored = None

    @property
    def monitored_layers(self):
        """The MoE layers being monitored (found when training begins)."""
        if self._monitored is None:
            self._monitored = self._find_layers()
        return list(self._monitored)

    def _find_layers(self):
        model = self.model
        if model is None:
            raise ValueError(
                "RoutingMonitor has no model: pass it to `model.fit(..., "
                "callbacks=[...])` or call `set_model` first."
            )
        all_layers = _unique(
            [model] + list(model._flatten_layers(include_self=False,
                                                 recursive=True))
        )
        moe_layers = [
            layer for layer in all_layers if isinstance(layer, _MOE_CLASSES)
        ]
        if self.layers is None:
            found = [layer for layer in moe_layers if layer.routing_metrics]
            if not found:
                off = [layer.name for layer in moe_layers]
                hint = (
                    f" Its MoE layers {off} were built with "
                    "routing_metrics=False, which the callback needs."
                    if off else ""
                )
                raise ValueError(
                    "RoutingMonitor found no MixtureOfExperts or "
                    "HierarchicalMixtureOfExperts layer with "
                    f"routing_metrics=True in model '{model.name}'.{hint}"
                )
            return _check_unique_names(found)
        by_name = {layer.name: layer for layer in all_layers}
        found = []
        for item in self.layers:
            if isinstance(item, str):
                _check_unique_names(
                    [layer for layer in moe_layers if layer.name == item]
                )
            layer = by_name.get(item) if isinstance(item, str) else item
            in_model = any(layer is other for other in all_layers)
            if layer is None or not in_model:
                raise ValueError(
                    f"`layers` names {getattr(item, 'name', item)!r}, which "
                    f"is not a layer of model '{model.name}'. Its MoE "
                    f"layers are: {[other.name for other in moe_layers]}"
                )
            if not isinstance(layer, _MOE_CLASSES):
                raise ValueError(
                    f"`layers` names {layer.name!r}, a "
                    f"{type(layer).__name__}, which is not a MixtureOfExperts "
                    "or HierarchicalMixtureOfExperts layer. The model's MoE "
                    f"layers are: {[other.name for other in moe_layers]}"
                )
            if not layer.routing_metrics:
                raise ValueError(
                    f"`layers` names {layer.name!r}, which was built with "
                    "routing_metrics=False: it keeps no per-expert load for "
                    "the callback to read. Build it with "
                    "routing_metrics=True."
                )
            found.append(layer)
        return _check_unique_names(_unique(found))

    def on_train_begin(self, logs=None):
        self._monitored = self._find_layers()
        if self.log_dir is not None and self._writer is None:
            self._writer = tf.summary.create_file_writer(
                os.fspath(self.log_dir)
            )

    def on_train_batch_end(self, batch, logs=None):
        self._batches += 1
        if self._batches % self.update_freq:
            return
        self.record()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None
        if self.heatmap_path is not None and self._records:
            self.save_heatmap(self.heatmap_path)

    def _step(self):
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is not None:
            return int(_to_numpy(optimizer.iterations, np.int64))
        return self._batches

    def record(self):
        """Reads and logs the layers' current `last_load` and
        `last_importance` now; `fit` calls it every `update_freq` batches.
        """
        step = self._step()
        for layer in self.monitored_layers:
            if not hasattr(layer, "last_load"):
                raise ValueError(
                    f"MoE layer '{layer.name}' is not built yet: it has no "
                    "`last_load` to read. Train the model first."
                )
            load = _to_numpy(layer.last_load).reshape(-1)
            importance = _to_numpy(layer.last_importance).reshape(-1)
            records = self._records.setdefault(
                layer.name, {"step": [], "load": [], "importance": []}
            )
            records["step"].append(step)
            records["load"].append(load)
            records["importance"].append(importance)
            if self._writer is not None:
                self._write_summaries(layer.name, step, load, importance)

    def _write_summaries(self, name, step, load, importance):
        with self._writer.as_default():
            for key, values in (("load", load), ("importance", importance)):
                tag = f"{name}/{key}"
                tf.summary.experimental.write_raw_pb(
                    tf.raw_ops.HistogramSummary(
                        tag=tag, values=tf.constant(values, tf.float32)
                    ),
                    step=step,
                    name=tag,
                )
                if self.per_expert_scalars:
                    tf.summary.experimental.write_raw_pb(
                        tf.raw_ops.ScalarSummary(
                            tags=[f"{tag}/expert_{i}"
                                  for i in range(len(values))],
                            values=tf.constant(values, tf.float32),
                        ),
                        step=step,
                        name=tag,
                    )

    @property
    def history(self):
        """Per layer name: `{"step": int64 [records], "load": float32
        [records, num_experts], "importance": float32 [records,
        num_experts]}`, as numpy arrays (a copy)."""
        return {
            name: {
                "step": np.asarray(records["step"], np.int64),
                "load": np.asarray(records["load"], np.float32),
                "importance": np.asarray(records["importance"], np.float32),
            }
            for name, records in self._records.items()
        }

    def save_heatmap(
        self,
        path,
        layers=None,
        vmax=2.0,
        colormap="coolwarm",
        cell_size=(8, 2),
        max_steps=1000,
    ):
        """Writes a PNG heat map of the recorded expert load over training.

        One row of cells per expert, one column per recorded step, left to
        right; with several layers, their maps are stacked top to bottom in
        model order, `SEPARATOR_HEIGHT` (2) rows of black pixels apart. The
        colour of a cell is the expert's load relative to the mean load of
        that step (see `save_load_heatmap`).

        Args:
            path: the PNG file to write (str or path-like); its directory
                is created if needed.
            layers: optional list of layer names to draw (default: all
                recorded layers).
            vmax, colormap, cell_size, max_steps: as in
                `save_load_heatmap`.

        Returns:
            The image as a uint8 array, `(height, width, 3)` (or
            `(height, width)` with `colormap="gray"`).
        """
        history = self.history
        if not history:
            raise ValueError(
                "RoutingMonitor has recorded nothing yet: train the model "
                "with the callback (or call `record()`) before "
                "`save_heatmap`."
            )
        if layers is None:
            names = list(history)
        else:
            if isinstance(layers, str):
                layers = [layers]
            names = list(layers)
            unknown = [name for name in names if name not in history]
            if unknown:
                raise ValueError(
                    f"`layers` {unknown} were not recorded. Recorded layers: "
                    f"{list(history)}"
                )
        return save_load_heatmap(
            path,
            [history[name]["load"] for name in names],
            vmax=vmax,
            colormap=colormap,
            cell_size=cell_size,
            max_steps=max_steps,
        )


def save_load_heatmap(
    path, load, vmax=2.0, colormap="coolwarm", cell_size=(8, 2),
    max_steps=None,
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

    The image has one row of `cell_size[0]` pixels per expert (expert 0 at
    the top) and one column of `cell_size[1]` pixels per step (the first
    step on the left): `width = steps * cell_size[1]`, `height =
    num_experts * cell_size[0]`. Given several load matrices (one per
    layer, with the same number of steps), their maps are stacked top to
    bottom, `SEPARATOR_HEIGHT` (2) rows of black pixels apart. The PNG is
    8-bit RGB (greyscale with `"gray"`), written with `zlib` alone: no
    plotting library is needed.

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
            groups, as `numpy.array_split` makes them) so the image is at
            most `max_steps` cells wide.

    Returns:
        The image as a uint8 array `(height, width, 3)` (`(height, width)`
        with `"gray"`).

    Example:

    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "load.png")
    >>> image = save_load_heatmap(path, [[2.0, 2.0], [4.0, 0.0]],
    ...                           colormap="gray", cell_size=(1, 1))
    >>> image.tolist()        # rows: experts; columns: steps
    [[128, 255], [128, 0]]
    """
    if isinstance(load, (list, tuple)) and load and np.ndim(load[0]) == 2:
        matrices = list(load)  # one matrix per layer
    else:
        matrices = [load]
    if isinstance(vmax, bool) or not isinstance(
        vmax, (int, float, np.integer, np.floating)
    ) or not vmax > 0 or not math.isfinite(vmax):
        raise ValueError(
            f"`vmax` must be a finite number > 0. Received: vmax={vmax!r}"
        )
    if colormap not in _COLORMAPS:
        raise ValueError(
            f"`colormap` must be one of {_COLORMAPS}. Received: "
            f"colormap={colormap!r}"
        )
    if (
        not isinstance(cell_size, (list, tuple))
        or len(cell_size) != 2
        or any(isinstance(c, bool) or not isinstance(c, (int, np.integer))
               or c < 1 for c in cell_size)
    ):
        raise ValueError(
            "`cell_size` must be a pair of ints >= 1, (height, width) in "
            f"pixels. Received: cell_size={cell_size!r}"
        )
    if max_steps is not None and (
        isinstance(max_steps, bool)
        or not isinstance(max_steps, (int, np.integer))
        or max_steps < 1
    ):
        raise ValueError(
            f"`max_steps` must be None or an int >= 1. Received: "
            f"max_steps={max_steps!r}"
        )
    levels = []
    for index, matrix in enumerate(matrices):
        matrix = np.asarray(matrix, dtype=np.float64)
        name = "load" if len(matrices) == 1 else f"load[{index}]"
        if matrix.ndim != 2 or matrix.shape[0] < 1 or matrix.shape[1] < 1:
            raise ValueError(
                f"`{name}` must be a non-empty 2-D array [steps, "
                f"num_experts]. Received: shape {matrix.shape}"
            )
        if not np.all(np.isfinite(matrix)) or np.any(matrix < 0):
            raise ValueError(
                f"`{name}` must hold finite loads >= 0. Received: min "
                f"{np.min(matrix)}, max {np.max(matrix)}"
            )
        if matrix.shape[0] != np.shape(matrices[0])[0]:
            raise ValueError(
                "All load matrices must have the same number of steps. "
                f"Received: {[np.shape(m)[0] for m in matrices]}"
            )
        mean = matrix.mean(axis=1, keepdims=True)
        relative = np.divide(matrix, mean, out=np.zeros_like(matrix),
                             where=mean > 0)
        if max_steps is not None and relative.shape[0] > max_steps:
            relative = np.stack(
                [chunk.mean(axis=0)
                 for chunk in np.array_split(relative, max_steps)]
            )
        levels.append(np.minimum(relative / vmax, 1.0).T)  # [experts, steps]

    height, width = cell_size
    channels = () if colormap == "gray" else (3,)
    blocks = []
    for i, level in enumerate(levels):
        if i:
            blocks.append(np.zeros(
                (SEPARATOR_HEIGHT, level.shape[1] * width) + channels,
                np.uint8))
        pixels = _colorize(level, colormap)
        pixels = np.repeat(np.repeat(pixels, height, axis=0), width, axis=1)
        blocks.append(pixels)
    image = np.concatenate(blocks, axis=0)
    path = os.fspath(path)
    directory = os.path.dirname(path)
    if directory:
        tf.io.gfile.makedirs(directory)
    with tf.io.gfile.GFile(path, "wb") as f:
        f.write(encode_png(image))
    return image


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


def encode_png(pixels):
    """The bytes of a PNG file holding `pixels`.

    Args:
        pixels: uint8 array `(height, width)` (8-bit greyscale) or
            `(height, width, 3)` (8-bit RGB), height and width >= 1.

    Returns:
        `bytes`: the signature, `IHDR`, one zlib-compressed `IDAT` (each
        scanline with filter type 0) and `IEND`.
    """
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3) or (
        pixels.ndim == 3 and pixels.shape[2] != 3
    ) or pixels.shape[0] < 1 or pixels.shape[1] < 1:
        raise ValueError(
            "`pixels` must be a non-empty uint8 array (height, width) or "
            f"(height, width, 3). Received: dtype {pixels.dtype}, shape "
            f"{pixels.shape}"
        )
    height, width = pixels.shape[:2]
    color_type = 0 if pixels.ndim == 2 else 2
    rows = np.ascontiguousarray(pixels).reshape(height, -1)
    raw = np.concatenate(
        [np.zeros((height, 1), np.uint8), rows], axis=1
    ).tobytes()

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    return b"".join([
        b"\x89PNG\r\n\x1a\n",
        chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, color_type,
                                   0, 0, 0)),
        chunk(b"IDAT", zlib.compress(raw, 9)),
        chunk(b"IEND", b""),
    ])


def _check_path(name, value):
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise ValueError(
            f"`{name}` must be a non-empty path (str or path-like) or None. "
            f"Received: {name}={value!r}"
        )
    return value


def _to_numpy(variable, dtype=np.float32):
    # `.value` is the backend variable (a tf.Variable, or a distributed one
    # whose `numpy()` reads the first replica's copy); numpy's `__array__`
    # protocol on the Keras variable warns under NumPy 2.
    value = getattr(variable, "value", variable)
    if hasattr(value, "numpy"):
        value = value.numpy()
    return np.array(value, dtype=dtype)


def _check_unique_names(layers):
    """Returns `layers` if their names differ: records, TensorBoard tags
    and the layers' metrics in the fit logs are keyed by layer name, and
    layers in different sub-models may share one."""
    names = [layer.name for layer in layers]
    shared = sorted({name for name in names if names.count(name) > 1})
    if shared:
        raise ValueError(
            f"RoutingMonitor found several MoE layers named {shared} (in "
            "different sub-models). Their records, TensorBoard tags and "
            "fit-log metrics are keyed by layer name: give each MoE layer "
            "its own `name=`."
        )
    return layers


def _unique(layers):
    seen, result = set(), []
    for layer in layers:
        if id(layer) not in seen:
            seen.add(id(layer))
            result.append(layer)
    return result
