"""ShardedEmbedding + SampledSoftmaxLoss under ParameterServerStrategy.

A local cluster on 127.0.0.1, on ports picked at run time: two parameter
servers and two workers (`tests/workers/ps_server.py`, one process hosting
the four gRPC servers) and a chief (`tests/workers/ps_train.py`) whose custom
loop trains a few steps through `ClusterCoordinator` -- Keras 3's `fit` does
not support this strategy. The shards of both tables must sit on the
parameter servers (`/job:ps/task:0` and `/job:ps/task:1`), and the losses
and final weights must equal a single-process run of the same steps in this
process.

Every wait is bounded, and the processes are killed (by their ids) when the
test ends, however it ends; they also exit by themselves when their parent
goes away. If the servers cannot start here (no gRPC on loopback, say) the
test is skipped with the servers' log.
"""

import json
import os
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from numerics import STEP, assert_close
from workers import harness

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
WORKERS_DIR = os.path.join(TESTS_DIR, "workers")
REPO_ROOT = os.path.dirname(TESTS_DIR)

SERVER_START_TIMEOUT_S = 60
CHIEF_TIMEOUT_S = 120


ps_train = harness.load_worker_module("ps_train")


def _env():
    env = {k: v for k, v in os.environ.items()
           if k.lower() not in ("http_proxy", "https_proxy", "all_proxy",
                                "grpc_proxy", "no_proxy", "tf_config")}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow",
               PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(
                   p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p))
    return env


class _Process:
    def __init__(self, name, args, log_dir):
        self.name = name
        self.log_path = os.path.join(log_dir, name + ".log")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable] + args, cwd=REPO_ROOT, env=_env(),
            stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=subprocess.STDOUT)

    def log(self, chars=4000):
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")[-chars:]

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()  # this process only, by its id
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()


class _ServersDidNotStart(Exception):
    pass


def _run_cluster(tmp_path):
    """Runs the cluster; returns the chief's results (dict of arrays).
    Raises _ServersDidNotStart (with the servers' log) if they could not."""
    ports = harness.free_ports(5)
    addr = ["127.0.0.1:%d" % p for p in ports]
    cluster = {"worker": addr[0:2], "ps": addr[2:4], "chief": addr[4:5]}
    tmp_path.mkdir(parents=True, exist_ok=True)
    out_path = str(tmp_path / "ps_result.npz")
    processes = []
    try:
        server = _Process(
            "servers",
            [os.path.join(WORKERS_DIR, "ps_server.py"), json.dumps(cluster),
             "ps:0", "ps:1", "worker:0", "worker:1"],
            str(tmp_path))
        processes.append(server)
        # The chief imports TensorFlow while the servers start, then waits
        # for their ports.
        chief = _Process(
            "chief",
            [os.path.join(WORKERS_DIR, "ps_train.py"), json.dumps(cluster),
             out_path, str(CHIEF_TIMEOUT_S)],
            str(tmp_path))
        processes.append(chief)
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while "READY" not in server.log():
            if server.proc.poll() is not None or time.monotonic() > deadline:
                raise _ServersDidNotStart(
                    "servers exited with %s or took over %d s; server "
                    "log:\n%s" % (server.proc.poll(), SERVER_START_TIMEOUT_S,
                                   server.log()))
            time.sleep(0.2)
        try:
            code = chief.proc.wait(timeout=CHIEF_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            code = None
        if code != 0 or not os.path.isfile(out_path):
            raise AssertionError(
                "the chief %s\n----- chief -----\n%s\n----- servers "
                "(exit code %s) -----\n%s" % (
                    "timed out after %d s" % CHIEF_TIMEOUT_S
                    if code is None else "exited with %s" % code,
                    chief.log(), server.proc.poll(), server.log()))
        with np.load(out_path) as f:
            return {k: f[k] for k in f.files}
    finally:
        for p in processes:
            p.kill()


def _single_process_run(data):
    model = ps_train.Model(data)
    optimizer = keras.optimizers.SGD(ps_train.LEARNING_RATE)
    optimizer.build(model.trainable_variables)
    step = ps_train.make_step(model, optimizer, data)
    losses = [float(step(tf.constant(i))) for i in range(ps_train.STEPS)]
    return np.asarray(losses, np.float32), model.weights()


def test_training_on_parameter_servers_matches_single_process(tmp_path):
    start = time.monotonic()
    for attempt in range(2):  # a second try, should a picked port be taken
        try:
            result = _run_cluster(tmp_path / ("attempt%d" % attempt))
            break
        except _ServersDidNotStart as e:
            reason = str(e)
    else:
        pytest.skip("the local ParameterServerStrategy cluster could not "
                    "start here: " + reason)
    elapsed = time.monotonic() - start

    devices = json.loads(str(result["devices"]))
    for table in ("input_embedding", "class_embedding"):
        shard_devices = devices[table]
        assert len(shard_devices) == 2
        for s, device in enumerate(shard_devices):
            spec = tf.DeviceSpec.from_string(device)
            assert (spec.job, spec.task) == ("ps", s), (table, shard_devices)

    data = ps_train.make_data()
    losses, weights = _single_process_run(data)
    assert np.isfinite(result["losses"]).all()
    # The rule of tests/numerics.py: the losses and each weight's update
    # over the run, at depth STEP per step.
    depth = STEP * ps_train.STEPS
    assert_close(result["losses"], losses, depth, what="losses")
    for name, value in weights.items():
        assert_close(result[name] - data[name], value - data[name], depth,
                     what=name)
        # The steps changed every weight.
        assert not np.allclose(value, data[name]), name
    print("parameter-server run: %.1f s" % elapsed)
