"""A stacked expert kernel `[num_experts, in, out]` (or its optimizer
slots) held as one shard per replica device, that saves and loads as the
whole tensor."""

import numpy as np
import tensorflow as tf

from keras_moe import initialization, private_hooks, xla


class ShardGroup(tf.__internal__.tracking.Trackable):
    """The shards of one `[num_experts, ...]` tensor, one per replica, read
    and saved whole.

    `shards` are this worker's (all of them but under
    MultiWorkerMirroredStrategy, where each worker holds its replicas'),
    `first_shard` on, of `num_shards` in all. Read whole (`value()`,
    `numpy()`, `tf.convert_to_tensor`) they are one tensor, and
    `tf.train.Checkpoint` saves them as that tensor (restored into any
    number of shards).
    """

    def __init__(self, shards, num_shards=None, first_shard=0):
        self.shards = list(shards)
        self.first_shard = first_shard
        self._num_shards = num_shards or len(self.shards)

    @property
    def num_shards(self):
        """The shards of all workers: one per replica."""
        return self._num_shards

    def local_shard(self, replica_id):
        """The shard of replica `replica_id` (one of this worker's)."""
        return self.shards[replica_id - self.first_shard]

    @property
    def shape(self):
        first = self.shards[0].shape
        return tf.TensorShape(
            (first[0] * self.num_shards,) + tuple(first[1:]))

    @property
    def dtype(self):
        return self.shards[0].dtype

    @property
    def name(self):
        return self.shards[0].name.rsplit("_shard_", 1)[0]

    def value(self):
        if len(self.shards) == self.num_shards:
            return tf.concat(
                [tf.convert_to_tensor(s) for s in self.shards], 0)
        return _gathered_over_workers(self)

    def numpy(self):
        if len(self.shards) == self.num_shards:
            return np.concatenate(
                [np.asarray(s.numpy()) for s in self.shards])
        return self.value().numpy()

    def assign(self, value):
        """Assigns a whole `[num_experts, in, out]` value, shard by shard."""
        value = tf.convert_to_tensor(value, self.dtype)
        if not value.shape.is_compatible_with(self.shape):
            raise ValueError(
                f"A sharded kernel of shape {tuple(self.shape)} cannot take "
                f"a value of shape {tuple(value.shape)}."
            )
        parts = split(value, self.num_shards)
        for index, shard in enumerate(self.shards, self.first_shard):
            shard.assign(parts[index])

    def __getitem__(self, index):
        return self.value()[index]

    def _serialize_to_tensors(self):
        return {"VARIABLE_VALUE": self.value()}

    def _restore_from_tensors(self, restored_tensors):
        self.assign(restored_tensors["VARIABLE_VALUE"])
        return tf.group([s.value for s in self.shards])


class ShardedKernel(ShardGroup):
    """Layer `l` of every expert, split over the replicas' devices.

    Shard `r` is an ordinary (not mirrored) variable
    `[num_experts / num_shards, in, out]` on replica `r`'s device, holding
    experts `[r * E / R, (r + 1) * E / R)`. Read whole it is the replicated
    layer's kernel, and it is saved as that kernel (see `ShardGroup`).
    """

    def __init__(self, shards, num_shards=None, first_shard=0):
        super().__init__(shards, num_shards, first_shard)
        for index, shard in enumerate(self.shards, first_shard):
            # What ExpertParallelOptimizer reads to keep the shard's update
            # on its own device.
            shard._keras_moe_shard = (self, index)
            # Until an ExpertParallelOptimizer takes the shards: a plain
            # optimizer then makes no slots for them (TensorFlow's would
            # fail, unclearly, to mirror them), so that the layer's own
            # error ("train with ExpertParallelOptimizer") is the one a
            # user sees at the first training step.
            shard.overwrite_with_gradient = True


def _gathered_over_workers(kernel):
    """The whole kernel when each worker holds only its own shards
    (MultiWorkerMirroredStrategy): an all-gather, which every worker must
    run at the same point (as it runs saving), from outside a replica
    function."""
    strategy = tf.distribute.get_strategy()
    if not tf.distribute.in_cross_replica_context() or (
            strategy.num_replicas_in_sync != kernel.num_shards):
        raise ValueError(
            f"The whole kernel {kernel.name} of experts sharded over "
            f"{kernel.num_shards} replicas of several workers is read by "
            "all workers together, in the scope of their strategy and "
            "outside `strategy.run`. Received: strategy="
            f"{type(strategy).__name__} with "
            f"{strategy.num_replicas_in_sync} replicas"
        )

    def gather():
        context = tf.distribute.get_replica_context()
        replica_id = tf.get_static_value(context.replica_id_in_sync_group)
        shard = tf.convert_to_tensor(kernel.local_shard(int(replica_id)))
        return context.all_gather(shard, axis=0)

    return strategy.experimental_local_results(strategy.run(gather))[0]


tf.register_tensor_conversion_function(
    ShardGroup,
    lambda kernel, dtype=None, name=None, as_ref=False: tf.cast(
        kernel.value(), dtype or kernel.dtype),
)


def shard_of(variable):
    """`(ShardedKernel, shard index)` when `variable` is a shard, else
    None."""
    return getattr(variable, "_keras_moe_shard", None)


def split(value, num_shards):
    """`value`'s rows in `num_shards` equal consecutive parts."""
    return tf.split(value, num_shards, axis=0)


def shard_devices(num_experts):
    """The devices of the strategy in scope when experts are to be sharded
    over its replicas (more than one), else None."""
    if not tf.distribute.has_strategy():
        return None
    strategy = tf.distribute.get_strategy()
    num_replicas = strategy.num_replicas_in_sync
    if num_replicas == 1:
        return None
    if not isinstance(strategy, (
            tf.distribute.MirroredStrategy,
            tf.distribute.MultiWorkerMirroredStrategy)):
        raise ValueError(
            "`expert_parallel=True` shards the experts over the replicas "
            "of a MirroredStrategy or MultiWorkerMirroredStrategy (it "
            "needs an all-to-all between replicas). Received: strategy="
            f"{type(strategy).__name__} with {num_replicas} replicas"
        )
    if num_experts % num_replicas:
        raise ValueError(
            "`expert_parallel=True` needs `num_experts` divisible by "
            "the number of replicas. Received: "
            f"num_experts={num_experts}, replicas={num_replicas}"
        )
    return list(strategy.extended.worker_devices)


def first_local_replica():
    """The replica id of this worker's first device under the strategy in
    scope: 0 but under MultiWorkerMirroredStrategy, whose worker `t`
    (with `n` devices) holds replicas `[t * n, (t + 1) * n)`."""
    strategy = tf.distribute.get_strategy()
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return 0
    return (strategy.cluster_resolver.task_id
            * len(strategy.extended.worker_devices))


def replica_kernels(experts, replica_id, training):
    """The kernels of replica `replica_id`'s experts, in the compute dtype,
    for a `FeedForwardExperts` layer whose experts are sharded; refuses to
    train them without `keras_moe.ExpertParallelOptimizer` (a plain
    optimizer would not update the shards)."""
    xla.check_not_xla(
        "Experts sharded over replicas (`expert_parallel=True`)",
        "Train without `jit_compile=True`, or without `expert_parallel`.",
    )
    if training and not getattr(
            experts.kernels[0], "trained_by_expert_parallel_optimizer",
            False):
        raise ValueError(
            "Experts sharded over replicas (`expert_parallel=True`) "
            "train only with `keras_moe.ExpertParallelOptimizer("
            "optimizer)`, built before the first training step "
            "(`model.fit` builds it; in a custom loop call "
            "`optimizer.build(model.trainable_variables)` first). "
            f"Layer: {experts.name}"
        )
    return [tf.cast(kernel.local_shard(replica_id), experts.compute_dtype)
            for kernel in experts.kernels]


def make_sharded_kernel(layer, name, shape, initializer, devices, offset):
    """Adds to `layer` one weight per device in `devices` (this worker's
    replicas' devices), the shards of a `[num_experts, in, out]` kernel
    split over all replicas of the strategy in scope, each expert
    initialized as the replicated layer initializes it
    (`initialization.stacked`, seeds `offset + expert`); returns their
    `ShardedKernel`."""
    num_experts = shape[0]
    num_shards = tf.distribute.get_strategy().num_replicas_in_sync
    first_shard = first_local_replica()
    per_shard = num_experts // num_shards
    shards = []
    for index, device in enumerate(devices, first_shard):
        with private_hooks.on_one_device(device):
            shards.append(layer.add_weight(
                name=f"{name}_shard_{index}",
                shape=(per_shard,) + tuple(shape[1:]),
                initializer=initialization.stacked(
                    initializer, per_shard, offset=offset + index * per_shard),
            ))
    return ShardedKernel(shards, num_shards, first_shard)
