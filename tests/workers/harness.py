"""Starting, waiting for and always cleaning up the worker processes of the
multi-process tests (tests/test_multi_worker.py,
tests/test_fault_tolerance.py), and the test-side helpers they share.

Test-side only: the test files load this module by path. Everything runs on
127.0.0.1 with ports picked at run time; every wait is bounded; every
process started through a `Processes` group is killed when its `with` block
ends, whether the test passed, failed or timed out.

    with harness.Processes(tmp_path) as procs:
        workers = procs.start_cluster("mwms_train.py", ["--steps", "3"], 2)
        procs.wait(workers, timeout=60)      # raises WorkerError on failure
"""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np

from numerics import STEP, assert_close

WORKERS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(WORKERS_DIR))


class WorkerError(AssertionError):
    """A worker failed, timed out or exited unexpectedly; the message holds
    the tail of every worker's log."""


def timeout(base_s=60, max_scale=3.0):
    """The bound on one group of worker processes (from start to exit), as
    the load is now: `base_s` seconds on an idle machine, scaled up by the
    load average
    per core (at most `max_scale` times): each worker process spends most
    of its time importing TensorFlow and tracing, which on a 2-core machine
    shared with other jobs takes several times longer."""
    try:
        load = os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:
        load = 1.0
    return base_s * min(max(load, 1.0), max_scale)


def free_ports(n):
    """`n` distinct free TCP ports on 127.0.0.1 (bound to port 0, then
    released: the worker binds them again a moment later)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def tf_config(ports, index):
    return json.dumps({
        "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
        "task": {"type": "worker", "index": index},
    })


def worker_env(tf_config_json=None):
    """The environment of a worker: CPU only, quiet TensorFlow logs, the
    TensorFlow backend, no proxies for the loopback gRPC channels, TF_CONFIG
    only when given."""
    env = dict(os.environ)
    for name in list(env):
        if name.lower() in ("http_proxy", "https_proxy", "all_proxy",
                            "grpc_proxy", "tf_config"):
            del env[name]
    # CPU only, even on a machine with GPUs: the workers would all grab
    # the same accelerator, and these tests are about CPU collectives.
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["KERAS_BACKEND"] = "tensorflow"
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p
    )
    if tf_config_json is not None:
        env["TF_CONFIG"] = tf_config_json
    return env


class Worker:
    """One worker process; stdout and stderr go to `log_path`."""

    def __init__(self, name, script, args, env, log_dir):
        self.name = name
        self.log_path = os.path.join(log_dir, f"{name}.log")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(WORKERS_DIR, script),
             *map(str, args)],
            env=env,
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def returncode(self):
        return self.proc.poll()

    def log(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def tail(self, chars=3000):
        text = self.log()
        return text[-chars:]

    def kill(self):
        """SIGKILL (this process only, by its id) and reap it."""
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()


class Processes:
    """A group of worker processes, all killed when the `with` block ends."""

    def __init__(self, log_dir):
        self.log_dir = str(log_dir)
        os.makedirs(self.log_dir, exist_ok=True)
        self.workers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.kill_all()
        return False

    def kill_all(self):
        for worker in self.workers:
            worker.kill()

    def start(self, name, script, args=(), tf_config_json=None):
        worker = Worker(name, script, args, worker_env(tf_config_json),
                        self.log_dir)
        self.workers.append(worker)
        return worker

    def start_cluster(self, script, args, num_workers, name="worker",
                      per_worker_args=None):
        """`num_workers` processes of `script` forming one
        `MultiWorkerMirroredStrategy` cluster on fresh loopback ports;
        `per_worker_args(i)` adds arguments to worker `i`."""
        ports = free_ports(num_workers)
        return [
            self.start(
                f"{name}{i}", script,
                list(args)
                + list(per_worker_args(i) if per_worker_args else []),
                tf_config(ports, i),
            )
            for i in range(num_workers)
        ]

    def report(self, workers=None):
        return "\n".join(
            f"----- {w.name} (exit code {w.returncode}) -----\n{w.tail()}"
            for w in (workers or self.workers)
        )

    def wait(self, workers, timeout, expect_success=True):
        """Waits until every worker in `workers` has exited, at most
        `timeout` seconds; returns their exit codes. On timeout, or (with
        `expect_success`) on a non-zero exit code, kills the group and
        raises `WorkerError` with the logs. A worker that fails makes the
        others stop being waited for: in a cluster they would hang on the
        next collective."""
        deadline = time.monotonic() + timeout
        while True:
            codes = [w.returncode for w in workers]
            if all(c is not None for c in codes):
                break
            if expect_success and any(c not in (None, 0) for c in codes):
                break
            if time.monotonic() > deadline:
                self.kill_all()
                raise WorkerError(
                    f"workers still running after {timeout:.0f} s; killed\n"
                    + self.report(workers)
                )
            time.sleep(0.1)
        if expect_success and any(c != 0 for c in codes):
            self.kill_all()
            raise WorkerError(
                f"a worker failed: {codes}\n" + self.report(workers)
            )
        return codes

    def wait_any_exit(self, workers, timeout):
        """Waits until one of `workers` has exited; returns it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for worker in workers:
                if worker.returncode is not None:
                    return worker
            time.sleep(0.1)
        self.kill_all()
        raise WorkerError(
            f"no worker exited within {timeout:.0f} s; killed\n"
            + self.report(workers)
        )


def load_worker_module(name):
    """`tests/workers/<name>.py` imported into this process (once)."""
    module_name = f"_keras_moe_test_workers_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            module_name, os.path.join(WORKERS_DIR, f"{name}.py")
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[module_name] = module
    return sys.modules[module_name]


def load_weights(path):
    """`(names, weights, extras)` from a worker's `.npz`: the variable
    paths, the arrays in `model.get_weights()` order, and anything else."""
    with open(path, "rb") as f:
        data = dict(np.load(f))
    names = [str(n) for n in data.pop("names")]
    weights = [data.pop(f"w{i}") for i in range(len(names))]
    return names, weights, data


def model_weights(model):
    return [str(v.path) for v in model.weights], model.get_weights()


def assert_same_weights(actual, expected, what, initial=None, steps=1):
    """`actual` and `expected` are `(names, weights)`. With `initial` (the
    weights both started from), every weight moved as in `expected`: the
    updates compared by the rule of tests/numerics.py at depth
    `STEP * steps`; without it, every weight is exactly equal."""
    names, got = actual[0], actual[1]
    assert names == list(expected[0]), (names, expected[0])
    if initial is not None:
        assert names == list(initial[0]), (names, initial[0])
    for i, (name, a, b) in enumerate(zip(names, got, expected[1])):
        if initial is None:
            np.testing.assert_array_equal(a, b, err_msg=f"{what}: {name}")
        else:
            start = initial[1][i]
            assert_close(a - start, b - start, STEP * steps,
                         what=f"{what}: {name}")


def max_abs_difference(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a[1], b[1]))
