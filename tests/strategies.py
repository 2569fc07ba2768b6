"""In-process MirroredStrategy instances for the tests.

On CPUs MirroredStrategy all-reduces with collective ops, and every instance
numbers its collective groups from the same key: two strategies over
different device sets in one process collide ("joining a group with size 4,
but that group has size 2", or shape mismatches in a collective instance).
MirroredStrategy's class attribute `_collective_key_base` ("Only set this in
tests") gives each replica count its own keys, and every test shares the one
instance per replica count.
"""

import tensorflow as tf

_STRATEGIES = {}


def mirrored(num_replicas):
    """The MirroredStrategy over `/cpu:0` .. `/cpu:{num_replicas - 1}`."""
    if num_replicas not in _STRATEGIES:
        strategy_class = type(
            f"MirroredStrategy{num_replicas}",
            (tf.distribute.MirroredStrategy,),
            {"_collective_key_base": 1000 * num_replicas},
        )
        _STRATEGIES[num_replicas] = strategy_class(
            [f"/cpu:{i}" for i in range(num_replicas)]
        )
    return _STRATEGIES[num_replicas]
