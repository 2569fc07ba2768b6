"""The original: the 2017 LocalMixtureOfExperts, built in a tf.compat.v1
graph and Session (2 intra-op and 2 inter-op threads, Grappler on but for
its dependency optimizer) on the weights and inputs of configs.make_data,
and served from a worker process (forked before TensorFlow's runtime
starts) driven by JSON lines over pipes.

This module is the benchmarks' one user of the reference harness
(reference_harness/, which finds, loads and builds the original): the
other modules reach the original through `find_original`,
`load_original`, `build_original_graph` and `OriginalClient`."""

import gc
import json
import os
import sys
import time
import traceback

from configs import LOSS_COEF, THREADS, make_data


def _harness():
    """The reference harness's `original` (finding and loading the
    original) and `hierarchical` (building its MoE and setting its
    weights) modules. Imported here only, when first needed; bench_moe.py
    puts the repository root on sys.path."""
    from reference_harness import hierarchical, original

    return original, hierarchical


def find_original():
    """Path of the original expert_utils_2017.py (`KERAS_MOE_ORIGINAL` or
    `../shared/reference/`), or None."""
    return _harness()[0].find_original()


def load_original(path):
    """The original module, loaded from `path`."""
    return _harness()[0].load_original(path)


def build_original_graph(module, shape, data):
    """The original LocalMixtureOfExperts on `data` in a new v1 graph and
    Session. Returns (session, train placeholder, fetches by mode, sum |y|)."""
    import tensorflow as tf
    from tensorflow.core.protobuf import rewriter_config_pb2

    _, harness = _harness()
    v1 = tf.compat.v1
    graph = v1.Graph()
    with graph.as_default():
        # The arguments of the MixtureOfExperts the benchmark times.
        config = dict(input_dim=shape["d"], num_experts=shape["experts"],
                      k=shape["k"], hidden_sizes=(shape["hidden"],),
                      output_dim=None, autoscale=True, noisy_gating=True,
                      noise_epsilon=1e-2)
        moe, wvars = harness.build_original_moe(module, "local", config,
                                                name="moe")
        x_ph = v1.placeholder(tf.float32, data["x"].shape)
        x = v1.get_variable("bench_x", data["x"].shape, tf.float32,
                            v1.zeros_initializer(), trainable=False)
        train = v1.placeholder(tf.bool, [], name="train")
        y, importance, load, _, _ = moe.Eval(x, train)
        aux = LOSS_COEF * (module.CVSquared(importance)
                           + module.CVSquared(load))
        loss = tf.reduce_sum(tf.square(y)) + aux
        grads = v1.gradients(loss, moe.vars)
        grad_ts = []
        for g in grads:
            if g is None:
                continue
            if isinstance(g, tf.IndexedSlices):
                grad_ts += [g.values, g.indices]
            else:
                grad_ts.append(g)
        fwd = tf.group(y, aux)
        fetches = {"train_fwd": fwd, "train_fwd_bwd": tf.group(*grad_ts),
                   "infer_fwd": fwd}
        data_w = {"primary_gate_kernel": data["gate_kernel"],
                  "primary_noise_kernel": data["noise_kernel"],
                  "kernel_0": data["kernel_0"], "kernel_1": data["kernel_1"]}
        assigns, feeds = harness.assign_original_weights(
            wvars, data_w, sorted(wvars))
        assigns.append(v1.assign(x, x_ph))
        feeds[x_ph] = data["x"]
        init = v1.global_variables_initializer()
        check = tf.reduce_sum(tf.abs(y))
    config = v1.ConfigProto(intra_op_parallelism_threads=THREADS,
                            inter_op_parallelism_threads=THREADS)
    # Grappler's dependency optimizer would drop the control dependencies
    # of the fetched tf.group on stateless ops (nothing would run); the
    # other graph optimizations stay on, as a TF1 user had them.
    config.graph_options.rewrite_options.dependency_optimization = (
        rewriter_config_pb2.RewriterConfig.OFF)
    sess = v1.Session(graph=graph, config=config)
    sess.run(init)
    sess.run(assigns, feeds)
    del feeds
    return sess, train, fetches, check


def original_worker(path, cmd_fd, out_fd):
    """Serves {"op": "build"|"time"|"check"|"close"|"exit"} requests."""
    cmds = os.fdopen(cmd_fd, "r")
    out = os.fdopen(out_fd, "w")
    module = load_original(path)
    graphs = {}

    def reply(obj):
        out.write(json.dumps(obj) + "\n")
        out.flush()

    for line in cmds:
        req = json.loads(line)
        op = req["op"]
        try:
            if op == "exit":
                break
            if op == "build":
                t = time.perf_counter()
                shape = req["shape"]
                data = make_data(shape, req["seed"])
                graphs[req["key"]] = build_original_graph(module, shape, data)
                del data
                gc.collect()
                reply({"ok": True, "build_s": time.perf_counter() - t})
            elif op == "time":
                sess, train, fetches, _ = graphs[req["key"]]
                fetch = fetches[req["mode"]]
                feed = {train: req["mode"] != "infer_fwd"}
                t = time.perf_counter()
                for _ in range(req["n"]):
                    sess.run(fetch, feed)
                reply({"ok": True,
                       "t": (time.perf_counter() - t) / req["n"]})
            elif op == "check":
                sess, train, _, check = graphs[req["key"]]
                reply({"ok": True,
                       "sum_abs_y": float(sess.run(check, {train: False}))})
            elif op == "close":
                entry = graphs.pop(req["key"], None)
                if entry is not None:
                    entry[0].close()
                gc.collect()
                reply({"ok": True})
            else:
                reply({"ok": False, "error": "unknown op %r" % op})
        except Exception as e:  # reported, the benchmark goes on
            reply({"ok": False, "error": "%s: %s" % (type(e).__name__, e),
                   "traceback": traceback.format_exc()})
    out.close()


class OriginalClient(object):
    """The main process's end of the original's worker process."""

    def __init__(self, path):
        self.path = path
        self.error = None
        cmd_r, cmd_w = os.pipe()
        out_r, out_w = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 0
            try:
                os.close(cmd_w)
                os.close(out_r)
                original_worker(path, cmd_r, out_w)
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                sys.stderr.flush()
                os._exit(code)
        os.close(cmd_r)
        os.close(out_w)
        self.pid = pid
        self._cmd = os.fdopen(cmd_w, "w")
        self._out = os.fdopen(out_r, "r")

    def send(self, **req):
        if self.error is not None:
            return {"ok": False, "error": self.error}
        try:
            self._cmd.write(json.dumps(req) + "\n")
            self._cmd.flush()
        except (BrokenPipeError, OSError) as e:
            self.error = "worker gone: %s" % e
            return {"ok": False, "error": self.error}
        return None

    def receive(self):
        if self.error is not None:
            return {"ok": False, "error": self.error}
        line = self._out.readline()
        if not line:
            self.error = "the original's worker process exited"
            return {"ok": False, "error": self.error}
        return json.loads(line)

    def request(self, **req):
        failed = self.send(**req)
        return failed if failed is not None else self.receive()

    def close(self):
        if self.error is None:
            try:
                self.send(op="exit")
                self._cmd.close()
            except OSError:
                pass
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass
