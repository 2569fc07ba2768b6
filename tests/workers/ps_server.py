"""Hosts TensorFlow gRPC servers of a local ParameterServerStrategy cluster
(tests/test_parameter_server.py).

    python ps_server.py CLUSTER_JSON ps:0 ps:1 worker:0 worker:1

Starts one `tf.distribute.Server` per `job:index` argument, all in this
process, prints `READY` and serves until killed (the test kills it by its
process id) or until its parent goes away.

Each server gets `inter_op_parallelism_threads=4`: with the default (the
number of cores) several servers sharing a 2-core machine deadlock, each
waiting on a thread another one holds.
"""

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402


def main(argv):
    cluster = tf.train.ClusterSpec(json.loads(argv[0]))
    config = tf.compat.v1.ConfigProto(
        inter_op_parallelism_threads=4, intra_op_parallelism_threads=2
    )
    servers = []
    for task in argv[1:]:
        job, index = task.split(":")
        servers.append(
            tf.distribute.Server(
                cluster, job_name=job, task_index=int(index), config=config,
                protocol="grpc", start=True,
            )
        )
    print("READY", flush=True)
    parent = os.getppid()
    while os.getppid() == parent:
        time.sleep(0.5)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
