"""TF Model Garden's `MoeLayer` for bench_peers.py, in a process of its own.

`official.nlp.modeling.layers.MoeLayer` (tf-models-official) is written on
tf_keras (Keras 2), which cannot share a process with keras_moe's Keras 3,
so it runs here, under the Python of a separate environment (the one-time
setup is in benchmarks/README.md), as a worker that bench_peers.py drives
with JSON lines over its standard input and output:

    {"op": "build", "key", "shape", "seed", "capacity_factor"}
    {"op": "time", "key", "mode", "n"} -> seconds per call
    {"op": "close", "key"}, {"op": "exit"}

The worker's first line says whether `official` imported (and its
versions). The layer gets the weights and inputs of configs.make_data
(gate kernel as the router's kernel, the two expert kernels as its
experts'; biases zero) and `relu`, as keras_moe's default experts. It has
one router, `ExpertsChooseMaskedRouter`: each expert of a group of
`seq` tokens takes its top `round(capacity_factor * seq / experts)`; with
`capacity_factor = k` that is `k * tokens` expert slots in all, the useful
work of a top-k layer. The timed modes are bench_peers.py's: `train_step`
(forward, backward, one SGD update, under `tf.function`) and `serve_fwd`
(the inference forward).

This module is imported by bench_peers.py for `ModelGardenClient` and run
as a script (the worker); only the worker imports TensorFlow or
tf_keras."""

import json
import os
import subprocess
import sys
import time
import traceback

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))


def _versions():
    import importlib.metadata as metadata

    import tensorflow as tf
    import tf_keras

    try:
        official = metadata.version("tf-models-official")
    except metadata.PackageNotFoundError:
        official = "?"
    return {"tensorflow": tf.__version__, "tf_keras": tf_keras.__version__,
            "tf_models_official": official}


def build_layer(shape, seed, capacity_factor):
    """The MoeLayer on configs.make_data's weights, its step functions by
    mode and its input. Returns (layer, {mode: fn}, x)."""
    import numpy as np
    import tensorflow as tf
    import tf_keras
    from official.nlp.modeling.layers import (ExpertsChooseMaskedRouter,
                                              FeedForwardExperts, MoeLayer)

    from configs import make_data

    data = make_data(shape, seed)
    batch, seq, d = shape["batch"], shape["seq"], shape["d"]
    experts = FeedForwardExperts(shape["experts"], shape["hidden"],
                                 activation=tf_keras.activations.relu)
    router = ExpertsChooseMaskedRouter(shape["experts"], export_metrics=False)
    layer = MoeLayer(experts, router, train_capacity_factor=capacity_factor,
                     eval_capacity_factor=capacity_factor)
    x = tf.constant(data["x"].reshape(batch, seq, d))
    layer(x, training=False)  # builds the weights
    router.router_weights.kernel.assign(data["gate_kernel"])
    router.router_weights.bias.assign(np.zeros(shape["experts"], "float32"))
    experts.intermediate_layer.kernel.assign(data["kernel_0"])
    experts.output_layer.kernel.assign(data["kernel_1"])
    del data
    optimizer = tf_keras.optimizers.SGD(1e-3)
    weights = layer.trainable_variables
    optimizer.build(weights)

    @tf.function
    def train_step(x):
        with tf.GradientTape() as tape:
            y = layer(x, training=True)
            loss = tf.reduce_mean(tf.square(y)) + tf.add_n(layer.losses)
        optimizer.apply_gradients(zip(tape.gradient(loss, weights), weights))
        return loss

    @tf.function
    def serve_fwd(x):
        return layer(x, training=False)

    return layer, {"train_step": train_step, "serve_fwd": serve_fwd}, x


def expert_slots(shape, capacity_factor):
    """Expert slots (token copies run through an expert) per call."""
    capacity = int(round(capacity_factor * shape["seq"] / shape["experts"]))
    return shape["batch"] * shape["experts"] * capacity


def worker(threads):
    """Serves requests from stdin; replies on the original stdout, which
    nothing else may write to (TensorFlow's prints go to stderr)."""
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.path.insert(0, BENCH_DIR)

    def reply(obj):
        replies.write(json.dumps(obj) + "\n")
        replies.flush()

    import importlib.util

    missing = [m for m in ("official", "tf_keras")
               if importlib.util.find_spec(m) is None]
    if missing:  # said at once, before TensorFlow's slow import
        reply({"ok": False, "error": "no module named %s" % " or ".join(
            repr(m) for m in missing)})
        return
    try:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
        import official.nlp.modeling.layers  # noqa: F401
    except Exception as e:  # said to the client, which skips the peer
        reply({"ok": False, "error": "%s: %s" % (type(e).__name__, e)})
        return
    reply({"ok": True, "versions": _versions()})
    built = {}
    for line in sys.stdin:
        req = json.loads(line)
        op = req["op"]
        try:
            if op == "exit":
                break
            if op == "build":
                start = time.perf_counter()
                shape = req["shape"]
                layer, fns, x = build_layer(shape, req["seed"],
                                            req["capacity_factor"])
                first = {}
                for mode, fn in fns.items():  # traces
                    t = time.perf_counter()
                    fn(x)
                    first[mode] = time.perf_counter() - t
                built[req["key"]] = (layer, fns, x)
                reply({"ok": True, "build_s": time.perf_counter() - start,
                       "first_call_s": first, "expert_slots": expert_slots(
                           shape, req["capacity_factor"])})
            elif op == "time":
                _, fns, x = built[req["key"]]
                fn = fns[req["mode"]]
                t = time.perf_counter()
                for _ in range(req["n"]):
                    fn(x)  # as timing.Runnable times ours
                reply({"ok": True,
                       "t": (time.perf_counter() - t) / req["n"]})
            elif op == "close":
                built.pop(req["key"], None)
                reply({"ok": True})
            else:
                reply({"ok": False, "error": "unknown op %r" % op})
        except Exception as e:  # reported, the benchmark goes on
            reply({"ok": False, "error": "%s: %s" % (type(e).__name__, e),
                   "traceback": traceback.format_exc()})
    replies.close()


class ModelGardenClient(object):
    """bench_peers.py's end of the worker: started at once (its imports
    overlap the main process's); `ready()` waits for its first line and
    says whether Model Garden imported. `request` has the interface
    timing.Runnable calls."""

    def __init__(self, python, threads):
        self.python = python
        self.error = None
        self.versions = None
        self._ready = False
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get(
            "TF_CPP_MIN_LOG_LEVEL", "2"))
        env.pop("KERAS_BACKEND", None)
        try:
            self._proc = subprocess.Popen(
                [python, os.path.abspath(__file__), "--worker",
                 "--threads", str(threads)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                env=env, cwd=BENCH_DIR)
        except OSError as e:
            self._proc = None
            self.error = "cannot start %s: %s" % (python, e)

    def ready(self):
        """True when the worker imported Model Garden; else self.error says
        why not."""
        if not self._ready and self.error is None:
            first = self.receive()
            self._ready = True
            if first.get("ok"):
                self.versions = first["versions"]
            else:
                self.error = "Model Garden not importable with %s: %s" % (
                    self.python, first.get("error"))
        return self.error is None

    def send(self, **req):
        if self.error is not None:
            return {"ok": False, "error": self.error}
        try:
            self._proc.stdin.write(json.dumps(req) + "\n")
            self._proc.stdin.flush()
        except OSError as e:
            # A worker that could not import Model Garden said why and left.
            if not self._ready and not self.ready():
                return {"ok": False, "error": self.error}
            self.error = "Model Garden worker gone: %s" % e
            return {"ok": False, "error": self.error}
        return None

    def receive(self):
        if self.error is not None:
            return {"ok": False, "error": self.error}
        line = self._proc.stdout.readline()
        if not line:
            self.error = "the Model Garden worker exited (status %s)" % (
                self._proc.wait(),)
            return {"ok": False, "error": self.error}
        return json.loads(line)

    def request(self, **req):
        failed = self.send(**req)
        return failed if failed is not None else self.receive()

    def close(self):
        if self._proc is None:
            return
        if self._proc.poll() is None:
            try:
                self._proc.stdin.write(json.dumps({"op": "exit"}) + "\n")
                self._proc.stdin.close()
            except OSError:
                pass
        try:
            self._proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", action="store_true", required=True)
    parser.add_argument("--threads", type=int, default=2)
    worker(parser.parse_args().threads)
