"""`ExpertParallelOptimizer`: any Keras optimizer, for models whose experts
are sharded over the replicas of a `tf.distribute` strategy."""

import keras
import tensorflow as tf

from keras_moe import all_to_all, expert_shards, private_hooks
from keras_moe.moe import MixtureOfExperts  # noqa: F401 (the example)


class _SlotShards(expert_shards.ShardGroup):
    """The slots of one name (`slot_name`) of the shards of one sharded
    kernel, read and saved as one `[num_experts, ...]` slot, as the
    replicated layer's optimizer has it."""

    def __init__(self, kernel, slot_name):
        # Filled shard by shard, as the wrapped optimizer makes them.
        super().__init__([None] * len(kernel.shards), kernel.num_shards,
                         kernel.first_shard)
        self.kernel = kernel
        self.slot_name = slot_name


class _WholeList(tf.__internal__.tracking.Trackable):
    """A list of trackables, checkpointed as a Keras tracked list is
    (children "0", "1", ...)."""

    def __init__(self, items):
        self.items = items

    def _trackable_children(self, save_type="checkpoint", **kwargs):
        return {str(i): item for i, item in enumerate(self.items)}


class _WholeView(tf.__internal__.tracking.Trackable):
    """What `tf.train.Checkpoint` saves of an optimizer (the wrapper, or the
    optimizer it wraps): its children, with each tracked list of variables
    holding every sharded kernel (and each group of shard slots) once,
    whole, where the replicated model's optimizer holds the kernel (or its
    slot). The checkpoint is then the same at any number of replicas."""

    def __init__(self, wrapper, optimizer):
        self.wrapper = wrapper
        self.optimizer = optimizer
        # One object per list: a checkpoint walks the children more than
        # once and keys them by identity.
        self.lists = {}

    def children(self, children):
        whole_children = {}
        for name, child in children.items():
            if isinstance(child, list):
                whole = self.lists.setdefault(name, _WholeList([]))
                whole.items = self.wrapper._whole(list(child))
                child = whole
            whole_children[name] = child
        return whole_children

    def _trackable_children(self, save_type="checkpoint", **kwargs):
        return self.children(
            self.optimizer._trackable_children(save_type, **kwargs))


class _ShardSlots:
    def __init__(self):
        self.slots = {}
        self.views = None


@keras.saving.register_keras_serializable(package="keras_moe")
class ExpertParallelOptimizer(keras.optimizers.Optimizer):
    """Trains a model whose experts are sharded over replicas
    (`MixtureOfExperts(expert_parallel=True)` under a strategy).

    Like Keras's `LossScaleOptimizer`, it wraps another optimizer. The
    gradient of an expert shard is already the whole batch's (its tokens
    came from every replica through an all-to-all), so it is applied as it
    is, on the shard's own device, by the replica that holds the shard;
    every other variable (mirrored) goes through the wrapped optimizer as
    usual (summed over replicas, applied everywhere). The optimizer's slots
    for a shard live on the shard's device. Saved (`.keras`,
    `save_weights`) the slots of the shards of a kernel are one
    `[num_experts, ...]` slot, as the replicated layer's optimizer has, so
    the state loads at any number of replicas. Without sharded experts it
    is the wrapped optimizer.

    Under `mixed_float16`, Keras wraps it in a `LossScaleOptimizer` (or
    wrap it yourself: `LossScaleOptimizer(ExpertParallelOptimizer(...))`).

    Args:
        optimizer: a Keras optimizer (SGD, Adam, AdamW, ...), without
            gradient clipping (`clipnorm`, `global_clipnorm`, `clipvalue`),
            gradient accumulation or EMA, which would have to see the
            shards of every replica at once.
        name: optional name.

    Example:

    >>> optimizer = ExpertParallelOptimizer(keras.optimizers.Adam(1e-3))
    >>> type(optimizer.inner_optimizer).__name__
    'Adam'
    >>> model = keras.Sequential([keras.Input((8,)), MixtureOfExperts(
    ...     4, dispatch="capacity", expert_parallel=True)])
    >>> model.compile(optimizer=optimizer, loss="mse")
    """

    def __init__(self, optimizer, name=None, **kwargs):
        if kwargs:
            raise ValueError(
                "ExpertParallelOptimizer takes only `optimizer` and `name`; "
                "set the other arguments on the wrapped optimizer. "
                f"Received: {sorted(kwargs)}"
            )
        if not isinstance(optimizer, keras.optimizers.Optimizer):
            raise TypeError(
                "`optimizer` must be a Keras optimizer. Received: "
                f"optimizer={optimizer!r}"
            )
        if isinstance(optimizer, (keras.optimizers.LossScaleOptimizer,
                                  ExpertParallelOptimizer)):
            raise ValueError(
                "Wrap the plain optimizer: "
                "LossScaleOptimizer(ExpertParallelOptimizer(Adam())), not "
                "the other way round (Keras adds the LossScaleOptimizer "
                "itself under mixed_float16). Received: "
                f"optimizer={type(optimizer).__name__}"
            )
        for argument in ("clipnorm", "global_clipnorm", "clipvalue"):
            if getattr(optimizer, argument, None):
                raise ValueError(
                    f"ExpertParallelOptimizer does not support `{argument}`:"
                    " clipping by a norm would need the norms of the "
                    "experts on every replica. Received: "
                    f"{argument}={getattr(optimizer, argument)}"
                )
        if optimizer.gradient_accumulation_steps or optimizer.use_ema:
            raise ValueError(
                "ExpertParallelOptimizer does not support "
                "`gradient_accumulation_steps` or `use_ema` on the wrapped "
                "optimizer. Received: gradient_accumulation_steps="
                f"{optimizer.gradient_accumulation_steps}, "
                f"use_ema={optimizer.use_ema}"
            )
        super().__init__(learning_rate=0.0, name=name)
        self.inner_optimizer = optimizer
        # id(slot) -> _SlotShards; in a plain object, which Keras does not
        # track (a dict attribute's variables would count as this
        # optimizer's own).
        self._shards = _ShardSlots()
        self._place_shard_slots(optimizer)

    def _place_shard_slots(self, optimizer):
        # The wrapped optimizer makes its slots through the public
        # `add_variable_from_reference`; for a shard, a slot on the
        # shard's device (TensorFlow's optimizer would try to mirror it
        # and fail: a shard is not a variable of the strategy).
        make_slot = optimizer.add_variable_from_reference
        groups = {}

        def add_variable_from_reference(reference_variable, name=None,
                                        initializer="zeros"):
            shard = expert_shards.shard_of(reference_variable)
            if shard is None:
                return make_slot(reference_variable, name=name,
                                 initializer=initializer)
            kernel, index = shard
            with private_hooks.on_one_device(reference_variable.value.device):
                slot = optimizer.add_variable(
                    shape=reference_variable.shape,
                    initializer=initializer,
                    dtype=reference_variable.dtype,
                    name=(f"{reference_variable.path.replace('/', '_')}_"
                          f"{name or 'var'}"),
                )
            group = groups.setdefault(
                (id(kernel), name), _SlotShards(kernel, name))
            group.shards[index - kernel.first_shard] = slot
            self._shards.slots[id(slot)] = group
            return slot

        optimizer.add_variable_from_reference = add_variable_from_reference

    @property
    def variables(self):
        return self._variables + self.inner_optimizer.variables

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        if "inner_optimizer" in self.__dict__:
            self.inner_optimizer.learning_rate = learning_rate
        # The base class sets its own (unused) one while constructing.

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    @property
    def loss_scale_factor(self):
        if "inner_optimizer" not in self.__dict__:
            return None
        return self.inner_optimizer.loss_scale_factor

    @loss_scale_factor.setter
    def loss_scale_factor(self, value):
        # The base class sets None while constructing: that must not
        # overwrite the wrapped optimizer's; a LossScaleOptimizer sets
        # None later to scale only once.
        if "inner_optimizer" in self.__dict__:
            self.inner_optimizer.loss_scale_factor = value

    def build(self, var_list):
        for variable in var_list:
            shard = expert_shards.shard_of(variable)
            if shard is not None:
                # Read by the sharded layer, which refuses to train without.
                shard[0].trained_by_expert_parallel_optimizer = True
                # Trained like any weight from now on (see ShardedKernel).
                variable.overwrite_with_gradient = False
        self.inner_optimizer.build(var_list)
        super().build(var_list)

    def apply(self, grads, trainable_variables=None):
        if not self.built:
            if trainable_variables is None:
                raise ValueError(
                    "ExpertParallelOptimizer.apply needs `trainable_variables`"
                    " before it is built: pass them, or call "
                    "`optimizer.build(model.trainable_variables)` first."
                )
            with keras.name_scope(self.name, caller=self):
                self.build(list(trainable_variables))
        if trainable_variables is None:
            trainable_variables = self._trainable_variables
        grads, trainable_variables = list(grads), list(trainable_variables)
        _, replica_id = all_to_all.replica_layout()
        own, rest = [], []
        for grad, variable in zip(grads, trainable_variables):
            shard = expert_shards.shard_of(variable)
            if shard is None:
                rest.append((grad, variable))
            elif shard[1] == replica_id and grad is not None:
                own.append((grad, variable))
        inner = self.inner_optimizer
        if own:
            # Before the wrapped optimizer's update, which counts the step.
            learning_rate = inner.learning_rate
            scale = inner.loss_scale_factor
            for grad, variable in own:
                if scale is not None:
                    grad = grad / scale
                if inner.weight_decay and private_hooks.uses_weight_decay(
                        inner, variable):
                    decay = tf.cast(inner.weight_decay * learning_rate,
                                    variable.dtype)
                    variable.assign_sub(variable * decay)
                inner.update_step(grad, variable, learning_rate)
        if rest:
            inner.apply([g for g, _ in rest], [v for _, v in rest])
        else:
            inner.iterations.assign_add(1)

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(var_list)

    def _whole(self, variables):
        """`variables` with the shards of a sharded kernel as the kernel
        and the slots of its shards as one `_SlotShards`, each once, where
        its first shard is."""
        whole = []
        for variable in variables:
            group = self._shards.slots.get(id(variable))
            shard = expert_shards.shard_of(variable)
            if group is None and shard is not None:
                group = shard[0]
            if group is None:
                whole.append(variable)
            elif variable is group.shards[0]:
                whole.append(group)
        return whole

    def _trackable_children(self, save_type="checkpoint", **kwargs):
        children = super()._trackable_children(save_type, **kwargs)
        if save_type == "checkpoint" and self._shards.slots:
            if self._shards.views is None:
                self._shards.views = (
                    _WholeView(self, self),
                    _WholeView(self, self.inner_optimizer))
            own, inner = self._shards.views
            children = dict(own.children(children), inner_optimizer=inner)
        return children

    def save_own_variables(self, store):
        for i, item in enumerate(self._whole(self.variables)):
            store[str(i)] = item.numpy()

    def load_own_variables(self, store):
        whole = self._whole(self.variables)
        if len(store.keys()) != len(whole):
            # As Keras's optimizers do: an unbuilt or different optimizer
            # starts afresh.
            return super().load_own_variables(store)
        for i, item in enumerate(whole):
            item.assign(store[str(i)])

    def get_config(self):
        return {
            "name": self.name,
            "optimizer": keras.saving.serialize_keras_object(
                self.inner_optimizer),
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        optimizer = keras.saving.deserialize_keras_object(
            config.pop("optimizer"), custom_objects=custom_objects)
        return cls(optimizer, **config)
