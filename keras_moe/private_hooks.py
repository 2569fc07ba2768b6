"""Every private Keras/TensorFlow hook keras_moe needs, in one place.

Public APIs come first; each hook below is here because none does the job.
`tests/test_private_hooks.py` checks every one of them against the installed
Keras and TensorFlow and fails, naming the hook and the versions, when an
upgrade moves or changes it.

- `control_flow_util.GraphOrParentsInXlaContext` (TensorFlow,
  `tensorflow.python.ops`): whether a function is being traced for XLA
  (`jit_compile=True`). No public API tells; keras_moe uses it to take the
  static-shape path under XLA and to refuse, with a clear error, what does
  not compile. If it moves, `xla_tracing()` answers None ("cannot tell"):
  `keras_moe.xla` then takes the choice that is right under XLA too and
  refuses nothing.
- `Layer._losses` (Keras): the list `add_loss` appends to, `Layer.losses`
  reads and `__call__` clears. `replica_thread_losses` replaces it with one
  list per replica thread under a `tf.distribute` strategy; Keras offers no
  way to keep `add_loss` terms apart for MirroredStrategy's replica threads,
  which run one layer's `call` in parallel. If it moves, the override is
  never read: losses of one replica can be cleared or read by another.
- `Layer._flatten_layers` (Keras): every sublayer of a model, nested ones
  included. `Model.layers` lists only the top level. If it moves,
  `all_sublayers` raises AttributeError.
- One attribute per tracked object, not a list (TensorFlow behaviour):
  `tf.train.Checkpoint` does not follow Keras's tracked lists, so variables
  and sublayers kept in a list attribute are not saved by a TF checkpoint.
  `set_checkpointable_list` / `checkpointable_list` keep them as
  `{prefix}_{i}` attributes, which it follows. If that behaviour changes,
  the workaround stays harmless; if attributes stop being followed, TF
  checkpoints of the layers lose weights.
- `collective_ops.all_to_all_v2` (TensorFlow, `tensorflow.python.ops`)
  launched like the strategy's own collectives
  (`strategy.extended._collective_ops._launchers[replica]`, under
  MultiWorkerMirroredStrategy `extended._cross_device_ops._launchers`: its group
  key, instance keys and ordering token): the `CollectiveAllToAllV2` op
  sends slice `r` of a tensor to replica `r`; `tf.distribute` offers
  all-reduce and all-gather but no all-to-all (tensorflow/tensorflow
  #77367). Ordered with the strategy's own collectives (one ordering
  token per device), replicas cannot run them in different orders, which
  deadlocks; instance keys fed at call time agree across workers.
  `collective_all_to_all` is `keras_moe.all_to_all`'s transport. If any
  of it moves, sharded experts raise ImportError naming it.
- `numpy_dataset.SingleDevice` (TensorFlow, `tensorflow.python.distribute`):
  passed as `colocate_with` to variable creation inside a strategy's scope,
  it makes an ordinary variable on one device instead of a mirrored one
  (`MirroredStrategy` honours it; `tf.device` inside the scope is ignored).
  `on_one_device` uses it to put each shard of the experts (and its
  optimizer slots) on its replica's device only. If it moves, sharded
  experts raise ImportError naming it.
- `Optimizer._use_weight_decay` (Keras): whether an optimizer decays a
  variable (`exclude_from_weight_decay`). `ExpertParallelOptimizer` applies
  the decay of expert shards itself, on their devices, and must honour the
  exclusions; Keras has no public test. If it moves, `uses_weight_decay`
  raises AttributeError naming it.
- `Layer._tracker.replace_tracked_value` (Keras): puts a sublayer in
  another's place among a layer's tracked sublayers. Keras locks a built
  layer's state ("You cannot add new elements of state ... to a layer that
  is already built") and has no public way to replace a sublayer;
  `replace_sublayer` uses it to swap a keras-hub decoder layer's MoE block
  for a sparse one (`keras_moe.integrations.keras_hub.sparsify`), in the old
  block's place so the weights keep their order. If it moves,
  `replace_sublayer` raises AttributeError naming it.
"""

import threading

import keras
import tensorflow as tf

try:  # TensorFlow's own test for "being traced for XLA"; private.
    from tensorflow.python.ops import control_flow_util
except ImportError:  # pragma: no cover - a TensorFlow that moved it
    control_flow_util = None

try:  # The all-to-all collective; private.
    from tensorflow.python.ops import collective_ops
except ImportError:  # pragma: no cover - a TensorFlow that moved it
    collective_ops = None

try:  # "One device, not mirrored" for variable creation; private.
    from tensorflow.python.distribute import numpy_dataset
except ImportError:  # pragma: no cover - a TensorFlow that moved it
    numpy_dataset = None


def xla_tracing():
    """True inside a function traced for XLA, False outside one, None where
    that cannot be told (TensorFlow's private test moved)."""
    if control_flow_util is None:
        return None
    return bool(
        control_flow_util.GraphOrParentsInXlaContext(
            tf.compat.v1.get_default_graph()
        )
    )


def in_replica_thread():
    """Whether this code runs in a replica function of a `tf.distribute`
    strategy (the threads MirroredStrategy runs its replicas in)."""
    return (
        tf.distribute.has_strategy()
        and not tf.distribute.in_cross_replica_context()
    )


def _get_losses(layer):
    if not in_replica_thread():
        return layer.__dict__.setdefault("_shared_losses", [])
    local = layer.__dict__.setdefault("_thread_losses", threading.local())
    if not hasattr(local, "losses"):
        local.losses = []
    return local.losses


def _set_losses(layer, value):
    if not in_replica_thread():
        layer.__dict__["_shared_losses"] = list(value)
        return
    local = layer.__dict__.setdefault("_thread_losses", threading.local())
    local.losses = list(value)


# Keras keeps `add_loss` terms in one list per layer, `Layer._losses`. Under
# MirroredStrategy the replicas run `call` in parallel threads and pause
# inside it (the cross-replica all-reduce, metric updates), so one replica
# would clear or read another's losses. Assigned as `_losses` in a layer
# class, this property makes the list per thread inside a replica function
# of a strategy (`strategy.run`, `fit` under a strategy); anywhere else it
# is the one list of the layer, as for Keras's own layers: a loss added in
# one thread shows in `layer.losses` in every other.
replica_thread_losses = property(_get_losses, _set_losses)


def all_sublayers(model):
    """Every layer inside `model`, nested ones included, `model` excluded
    (Keras's private `_flatten_layers`)."""
    return list(model._flatten_layers(include_self=False, recursive=True))


def set_checkpointable_list(owner, prefix, items):
    """Keeps `items` on `owner` as attributes `{prefix}_0`, `{prefix}_1`,
    ...: `tf.train.Checkpoint` follows attributes, not Keras's tracked
    lists."""
    for i, item in enumerate(items):
        setattr(owner, f"{prefix}_{i}", item)


def checkpointable_list(owner, prefix, count):
    """The `count` items `set_checkpointable_list` kept under `prefix`."""
    return [getattr(owner, f"{prefix}_{i}") for i in range(count)]


def collective_all_to_all(x, strategy, local_replica, timeout):
    """`CollectiveAllToAllV2` among the replicas of `strategy`, in its
    collective group and order: slice `r` of `x` (first dimension the
    number of replicas) goes to replica `r`; slice `s` of the result came
    from replica `s`. `local_replica` indexes this worker's replicas."""
    launchers = _collective_launchers(strategy)
    missing = [
        name for name in ("_next_instance_key", "_get_ordering_token",
                          "_group_key", "_group_size", "_device")
        if launchers and not hasattr(launchers[0], name)
    ]
    if (collective_ops is None
            or not hasattr(collective_ops, "all_to_all_v2")
            or not launchers or missing):
        raise ImportError(
            "keras_moe's sharded experts need TensorFlow's private "
            "`collective_ops.all_to_all_v2` and the strategy's collective "
            "launchers (`extended._collective_ops._launchers`), which this "
            f"TensorFlow or strategy ({type(strategy).__name__}) does not "
            f"have ({versions()})."
        )
    launcher = launchers[local_replica]
    instance_key = launcher._next_instance_key()
    ordering_token = launcher._get_ordering_token()
    with tf.device(launcher._device):
        return collective_ops.all_to_all_v2(
            x, launcher._group_size, launcher._group_key, instance_key,
            timeout=timeout, ordering_token=ordering_token,
        )


def _collective_launchers(strategy):
    """The launchers of the strategy's collectives, one per local replica:
    MirroredStrategy keeps them in `extended._collective_ops`,
    MultiWorkerMirroredStrategy in `extended._cross_device_ops`."""
    for name in ("_collective_ops", "_cross_device_ops"):
        launchers = getattr(
            getattr(strategy.extended, name, None), "_launchers", None)
        if launchers:
            return launchers
    return None


def on_one_device(device):
    """A `tf.variable_creator_scope` under which variables created in a
    strategy's scope are ordinary variables on `device`, not mirrored."""
    if numpy_dataset is None or not hasattr(numpy_dataset, "SingleDevice"):
        raise ImportError(
            "keras_moe's sharded experts need TensorFlow's private "
            "`tensorflow.python.distribute.numpy_dataset.SingleDevice`, "
            f"which this TensorFlow does not have ({versions()})."
        )

    def creator(next_creator, **kwargs):
        kwargs["colocate_with"] = numpy_dataset.SingleDevice(device)
        return next_creator(**kwargs)

    return tf.variable_creator_scope(creator)


def uses_weight_decay(optimizer, variable):
    """Whether `optimizer` applies its weight decay to `variable`."""
    if not hasattr(optimizer, "_use_weight_decay"):
        raise AttributeError(
            "keras_moe's ExpertParallelOptimizer needs Keras's private "
            "`Optimizer._use_weight_decay`, which this Keras does not have "
            f"({versions()})."
        )
    return optimizer._use_weight_decay(variable)


def replace_sublayer(layer, attribute, new_sublayer):
    """Puts `new_sublayer` in place of `layer`'s sublayer `attribute`, in
    its place among `layer`'s tracked sublayers (the weights keep their
    order), on a built `layer` too."""
    old_sublayer = getattr(layer, attribute)
    tracker = getattr(layer, "_tracker", None)
    if not hasattr(tracker, "replace_tracked_value"):
        raise AttributeError(
            "keras_moe.integrations.keras_hub needs Keras's private "
            "`Layer._tracker.replace_tracked_value`, which this Keras does "
            f"not have ({versions()})."
        )
    tracker.replace_tracked_value("layers", old_sublayer, new_sublayer)
    # Tracked already, so Keras's `__setattr__` adds nothing (and does not
    # refuse: a built layer's state is locked); TensorFlow's tracking
    # follows the attribute.
    setattr(layer, attribute, new_sublayer)


def versions():
    """The installed Keras and TensorFlow, for messages about hooks."""
    return f"Keras {keras.__version__}, TensorFlow {tf.__version__}"
