"""Moving slabs between the replicas of a `tf.distribute` strategy: a
differentiable all-to-all, for the experts sharded over replicas."""

import tensorflow as tf

from keras_moe import private_hooks

# Seconds a collective waits for the other replicas before it fails the
# step (`DeadlineExceededError`): a bug fails a test instead of hanging it.
TIMEOUT_SECONDS = 120.0


def replica_layout():
    """`(num_replicas, replica_id)` of the replica function running now;
    `(1, 0)` outside one (no strategy, or cross-replica context).

    `replica_id` is a Python int: each replica's function is traced on its
    own, with its own id as a constant.
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return 1, 0
    replica_id = tf.get_static_value(context.replica_id_in_sync_group)
    if replica_id is None:
        raise ValueError(
            "The experts are sharded over the replicas only where each "
            "replica's id is known when its function is traced "
            "(MirroredStrategy, MultiWorkerMirroredStrategy). Received: "
            f"strategy={type(context.strategy).__name__}"
        )
    return context.num_replicas_in_sync, int(replica_id)


def all_to_all(x):
    """`y[s]` = the `x[r]` replica `s` sent to this replica `r`.

    Args:
        x: a tensor whose first dimension is the number of replicas; the
            same shape on every replica.

    Returns:
        A tensor of `x`'s shape. Its gradient is the reverse all-to-all of
        the incoming gradient. Must be called in a replica function of a
        strategy, by every replica, the same number of times. Outside one
        (or with one replica) it returns `x`.

    Example:

    >>> strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    >>> strategy.run(all_to_all, args=(tf.ones([1, 2]),)).shape
    TensorShape([1, 2])
    """
    num_replicas, replica_id = replica_layout()
    if num_replicas == 1:
        return x
    if tf.executing_eagerly():
        # Eagerly the replicas run one after another, so a collective that
        # needs all of them at once would time out: an all-gather (R times
        # the traffic) of which each replica keeps its column.
        return _all_gather_all_to_all(x, replica_id)
    strategy = tf.distribute.get_strategy()
    # The strategy's launchers are this worker's: under
    # MultiWorkerMirroredStrategy worker `t` runs replicas `[t * n,
    # (t + 1) * n)` on its `n` devices.
    local_replica = replica_id % len(strategy.extended.worker_devices)

    @tf.custom_gradient
    def exchange(x):
        def send(x):
            _align_replicas()
            return private_hooks.collective_all_to_all(
                x, strategy, local_replica, TIMEOUT_SECONDS)

        # The reverse of an all-to-all is the same all-to-all.
        return send(x), send

    return exchange(x)


def _align_replicas():
    """Makes every replica reach this point of its tracing before any goes
    on (a `merge_call` that does nothing).

    MirroredStrategy traces its replicas one after another, each up to its
    next `merge_call`, and in a `tf.function` TensorFlow chains every
    stateful op without a resource (assertions, `check_numerics`) in the
    order it was created. Without this, an assertion replica 0 makes after
    its all-to-all would come before one replica 1 needs before its own:
    replica 1 would wait for replica 0's all-to-all, which waits for
    replica 1's. With it, the ops made before any replica's all-to-all
    come before those made after.
    """
    tf.distribute.get_replica_context().merge_call(lambda strategy: None)


def _all_gather_all_to_all(x, replica_id):
    context = tf.distribute.get_replica_context()
    # [sending replica, receiving replica, ...]
    gathered = context.all_gather(tf.expand_dims(x, 0), axis=0)
    return gathered[:, replica_id]
