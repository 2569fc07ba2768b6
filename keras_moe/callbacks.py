"""Keras callbacks that show how a model's MoE layers route its tokens:
per-expert load and importance in TensorBoard, and a heat map of expert load
over training (drawn by `keras_moe.heatmap`)."""

import os
import warnings

import keras
import numpy as np
import tensorflow as tf

from keras_moe import private_hooks, validation
from keras_moe.heatmap import (  # noqa: F401  (public here too)
    SEPARATOR_HEIGHT,
    _as_bool,
    _check_path,
    _encode_png,
    save_load_heatmap,
)
from keras_moe.hierarchical import HierarchicalMixtureOfExperts
from keras_moe.moe import MixtureOfExperts
from keras_moe.routers import Router

_MOE_CLASSES = (MixtureOfExperts, HierarchicalMixtureOfExperts)


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
    - records the router's own per-expert state likewise (`sigmoid_top_k`'s
      `expert_bias`, tagged `{layer name}/expert_bias`: the bias that
      balances its load; `Router.expert_state` says what a router has);
    - keeps them in `history`;
    - at the end of training, if `heatmap_path` is set, draws a PNG heat map
      of expert load over training (`save_heatmap`): one row per expert,
      one column per recorded step, labelled with the expert numbers, the
      steps, the layer name and a colour bar.

    The histograms are TensorFlow's classic histogram summaries (the ones
    the original `expert_utils.py` wrote with `summaries=True`); they need
    no TensorBoard installation to write, and TensorBoard shows them in its
    Histograms and Distributions tabs. The layers' scalar routing metrics
    (`{layer name}_aux_loss`, `..._load_cv2`, `..._switch_loss`,
    `..._z_loss`, `..._bias_spread`, ...) are in `fit`'s logs, which
    `keras.callbacks.TensorBoard` writes. Per-expert values of a hierarchical
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
            `"importance"` (float32 `[records, num_experts]`), and one
            entry per piece of router state (`"expert_bias"`, float32
            `[records, num_experts]`).

    Raises:
        TypeError: at construction, for an argument of the wrong type.
        ValueError: at construction, for a bad value; when training
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
        self.update_freq = validation.check_int("update_freq", update_freq, 1)
        self.per_expert_scalars = validation.check_bool(
            "per_expert_scalars", _as_bool(per_expert_scalars)
        )
        if layers is not None:
            if isinstance(layers, (str, keras.layers.Layer)):
                layers = [layers]
            layers = list(layers)
            if not layers:
                raise ValueError(
                    "`layers` must name at least one MoE layer, or be None "
                    "for all of them. Received: layers=[]"
                )
            for i, item in enumerate(layers):
                if not isinstance(item, (str, keras.layers.Layer)):
                    raise TypeError(
                        "`layers` must be a list of MoE layers or layer "
                        f"names. Received: layers[{i}]={item!r} (of type "
                        f"{type(item).__name__})"
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
            [model] + private_hooks.all_sublayers(model)
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
            values = {
                "load": _to_numpy(layer.last_load).reshape(-1),
                "importance": _to_numpy(layer.last_importance).reshape(-1),
            }
            for key, variable in _router_state(layer).items():
                values[key] = _to_numpy(variable).reshape(-1)
            records = self._records.setdefault(
                layer.name, {"step": [], **{key: [] for key in values}}
            )
            records["step"].append(step)
            for key, value in values.items():
                records[key].append(value)
            if self._writer is not None:
                self._write_summaries(layer.name, step, values)

    def _write_summaries(self, name, step, per_expert):
        with self._writer.as_default():
            for key, values in per_expert.items():
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
        num_experts]}` and the router's state (`"expert_bias"`, float32
        `[records, num_experts]`), as numpy arrays (a copy)."""
        return {
            name: {
                key: np.asarray(values,
                                np.int64 if key == "step" else np.float32)
                for key, values in records.items()
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
        labels=True,
        renderer="builtin",
    ):
        """Writes a PNG heat map of the recorded expert load over training.

        One row of cells per expert, one column per recorded step, left to
        right; with several layers, their maps are stacked top to bottom in
        model order, each under its layer's name. The colour of a cell is
        the expert's load relative to the mean load of that step (see
        `save_load_heatmap`); the step axis is labelled with the recorded
        steps (`history[name]["step"]`).

        Args:
            path: the PNG file to write (str or path-like); its directory
                is created if needed.
            layers: optional list of layer names to draw (default: all
                recorded layers).
            vmax, colormap, cell_size, max_steps, labels, renderer: as in
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
            if not names:
                raise ValueError(
                    "`layers` must name at least one recorded layer, or be "
                    "None for all of them. Received: layers=[]"
                )
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
            labels=labels,
            steps=history[names[0]]["step"],
            titles=names,
            renderer=renderer,
        )


def encode_png(pixels):
    """Deprecated: the bytes of a PNG file holding `pixels`, from
    `tf.io.encode_png`; call `tf.io.encode_png` instead.

    Args:
        pixels: uint8 array `(height, width)` (8-bit greyscale) or
            `(height, width, 3)` (8-bit RGB), height and width >= 1.

    Returns:
        `bytes`, the PNG file.
    """
    warnings.warn(
        "`keras_moe.callbacks.encode_png` is deprecated: use "
        "`tf.io.encode_png` (the heat maps are encoded with it).",
        DeprecationWarning,
        stacklevel=2,
    )
    array = np.asarray(pixels)
    if array.dtype != np.uint8:
        raise TypeError(
            "`pixels` must be a uint8 array. Received: pixels with dtype "
            f"{array.dtype}"
        )
    if array.ndim not in (2, 3) or (
        array.ndim == 3 and array.shape[2] != 3
    ) or 0 in array.shape[:2]:
        raise ValueError(
            "`pixels` must be a non-empty array (height, width) or "
            f"(height, width, 3). Received: pixels.shape={array.shape}"
        )
    return _encode_png(array)


def _router_state(layer):
    """The per-expert state of a flat MoE layer's router, by name."""
    gating = getattr(layer, "gating", None)
    if isinstance(gating, Router):
        return gating.expert_state()
    return {}


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
