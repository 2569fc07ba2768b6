"""Oracle harness: run the original 2017 `expert_utils.py` next to keras_moe.

The original is NOT part of this project. It is loaded at run time from a path
(`KERAS_MOE_ORIGINAL`, or `<repo>/../shared/reference/expert_utils_2017.py`),
its module-global `tf` replaced with a shim (everything in
`tensorflow.compat.v1` plus `contrib.training.HParams`), and run in a TF1
graph + session while eager execution stays on for Keras in the same process.

This module also holds the parity cases and the deterministic case data, so the
fixture generator (`tools/make_parity_fixtures.py`) and the parity tests
(`tests/test_parity.py`) agree on them.
"""

import importlib.util
import json
import os
import types
import zlib

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_FIXTURES = os.path.join(REPO_ROOT, "tests", "fixtures", "parity.npz")
MODES = (("train", True), ("infer", False))

# --------------------------------------------------------------------------
# Loading the original.
# --------------------------------------------------------------------------


class HParams(object):
    """Stand-in for `tf.contrib.training.HParams`: keyword args as attributes."""

    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)

    def __repr__(self):
        return "HParams(%r)" % (self.__dict__,)


class _TFShim(object):
    """`tensorflow.compat.v1` plus `contrib.training.HParams`."""

    def __init__(self):
        import tensorflow as tf

        self._v1 = tf.compat.v1
        self.contrib = types.SimpleNamespace(
            training=types.SimpleNamespace(HParams=HParams))

    def __getattr__(self, name):
        return getattr(self._v1, name)


def find_original():
    """Path of the original expert_utils_2017.py, or None."""
    candidates = []
    env = os.environ.get("KERAS_MOE_ORIGINAL")
    if env:
        candidates.append(env)
    candidates.append(
        os.path.join(REPO_ROOT, os.pardir, "shared", "reference",
                     "expert_utils_2017.py"))
    for path in candidates:
        if os.path.isfile(path):
            return os.path.abspath(path)
    return None


_LOADED = {}


def load_original(path):
    """Import the original module from `path`, with `tf` replaced by the shim."""
    path = os.path.abspath(path)
    if path in _LOADED:
        return _LOADED[path]
    spec = importlib.util.spec_from_file_location(
        "_keras_moe_oracle_expert_utils_2017", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.tf = _TFShim()
    _LOADED[path] = module
    return module


# --------------------------------------------------------------------------
# Cases.
# --------------------------------------------------------------------------

_DEFAULTS = dict(
    tokens=16,
    d=8,
    n=6,
    k=2,
    output_dim=None,
    hidden=(),
    autoscale=True,
    noisy=True,
    noise_epsilon=1e-2,
    loss_coef=0.1,
    multiplier=False,
    gating_inputs=False,
)


def _case(name, **kwargs):
    c = dict(_DEFAULTS)
    unknown = set(kwargs) - set(c)
    assert not unknown, unknown
    c.update(kwargs)
    c["name"] = name
    c["hidden"] = tuple(c["hidden"])
    return c


CASES = [
    _case("noisy_k2"),
    _case("noisy_k1", k=1, tokens=12),
    _case("noisy_k_eq_n", n=4, k=4, tokens=10),
    _case("noisy_k_eq_n_minus_1", n=5, k=4, tokens=12),
    _case("noisy_k3_eps_coef1", d=6, n=6, k=3, tokens=10, noise_epsilon=0.05,
          loss_coef=1.0),
    _case("clean_k2", noisy=False),
    _case("clean_k1", noisy=False, k=1, n=5),
    _case("clean_k_eq_n", noisy=False, n=4, k=4, tokens=10),
    _case("hidden_autoscale", hidden=(7, 5), k=3, tokens=14),
    _case("hidden_no_autoscale", hidden=(7, 5), k=3, autoscale=False,
          tokens=14),
    _case("hidden_clean_d6", hidden=(7, 5), d=6, n=5, k=2, noisy=False),
    _case("output_dim", output_dim=5, hidden=(7,), n=5, k=2),
    _case("output_dim_no_hidden", output_dim=11, d=6, n=4, k=2, tokens=12),
    _case("gate_multiplier", multiplier=True, k=2),
    _case("gate_multiplier_hidden", multiplier=True, hidden=(7, 5), k=3,
          n=5, output_dim=6),
    _case("gating_inputs", gating_inputs=True, k=2),
    _case("gating_inputs_hidden", gating_inputs=True, hidden=(7, 5), k=3,
          output_dim=5, tokens=14),
    _case("gating_inputs_clean", gating_inputs=True, noisy=False, n=5, k=2),
]

CASES_BY_NAME = {c["name"]: c for c in CASES}


def output_dim(case):
    return case["output_dim"] if case["output_dim"] is not None else case["d"]


def layer_sizes(case):
    return [case["d"]] + list(case["hidden"]) + [output_dim(case)]


def make_case_data(case):
    """Deterministic inputs, weights and noise for `case` (float32 numpy)."""
    rng = np.random.RandomState(zlib.crc32(case["name"].encode()) & 0x7FFFFFFF)
    t, d, n = case["tokens"], case["d"], case["n"]
    f32 = lambda a: np.asarray(a, np.float32)
    data = {}
    data["x"] = f32(rng.normal(size=(t, d)))
    if case["gating_inputs"]:
        data["gating_x"] = f32(rng.normal(size=(t, d)))
    if case["multiplier"]:
        m = rng.uniform(0.25, 2.0, size=(t,))
        m[t // 3] = 0.0  # one example switched off entirely
        data["multiplier"] = f32(m)
    if case["noisy"]:
        data["noise"] = f32(rng.normal(size=(t, n)))
    data["gate_kernel"] = f32(0.5 * rng.normal(size=(d, n)))
    if case["noisy"]:
        data["noise_kernel"] = f32(0.5 * rng.normal(size=(d, n)))
    sizes = layer_sizes(case)
    for l in range(len(sizes) - 1):
        data["kernel_%d" % l] = f32(
            0.5 * rng.normal(size=(n, sizes[l], sizes[l + 1])))
    # Coefficients of the gating-alone loss sum(gates * C) + sum(load * L).
    data["gating_coef_gates"] = f32(rng.normal(size=(t, n)))
    data["gating_coef_load"] = f32(rng.normal(size=(n,)))
    return data


def weight_names(case):
    names = ["gate_kernel"]
    if case["noisy"]:
        names.append("noise_kernel")
    names += ["kernel_%d" % l for l in range(len(layer_sizes(case)) - 1)]
    return names


def gating_weight_names(case):
    return ["gate_kernel"] + (["noise_kernel"] if case["noisy"] else [])


# --------------------------------------------------------------------------
# Running the original.
# --------------------------------------------------------------------------


def run_oracle(module, case, data):
    """Runs `case` through the original, in training and in inference.

    Returns {"train": results, "infer": results}; results has
      gates       [T, n]  the gating network's gates (before the multiplier)
      load        [n]     the gating network's load
      importance  [n]     as returned by the MoE's Eval
      y           [T, o]
      aux_loss    loss_coef * (CVSquared(importance) + CVSquared(load))
      grad/<w>    d(sum(y**2) + aux_loss)/dw for w in weight_names(case);
                  expert kernels stacked over experts: [n, in, out]
      gating_grad/<w>  d(sum(gates*C) + sum(load*L))/dw, w in gate/noise
    """
    import tensorflow as tf

    v1 = tf.compat.v1
    n, k, d = case["n"], case["k"], case["d"]
    out_dim = output_dim(case)
    graph = v1.Graph()
    with graph.as_default():
        gating_hp = module.NoisyTopKGatingParams()
        gating_hp.num_experts = n
        gating_hp.k = k
        gating_hp.noisy_gating = case["noisy"]
        gating_hp.noise_epsilon = case["noise_epsilon"]
        expert_hp = module.FeedForwardExpertParams()
        expert_hp.hidden_layer_sizes = list(case["hidden"]) or None
        expert_hp.autoscale = case["autoscale"]

        train = v1.placeholder(tf.bool, [], name="train")
        x = v1.constant(data["x"])
        if case["gating_inputs"]:
            moe = module.DistributedMixtureOfExperts(
                gating_hp, None, expert_hp, d, out_dim, ["/cpu:0"], "moe")
            gating = moe._primary_gating
            experts = moe._experts
        else:
            moe = module.LocalMixtureOfExperts(gating_hp, expert_hp, d,
                                               out_dim, "moe")
            gating = moe._gating
            experts = moe._experts

        captured = []
        gating_eval = gating.Eval

        def capturing_eval(*args, **kwargs):
            res = gating_eval(*args, **kwargs)
            captured.append(res)
            return res

        gating.Eval = capturing_eval

        if case["gating_inputs"]:
            gx = v1.constant(data["gating_x"])
            ys, importance, load, _, _ = moe.Eval(["/cpu:0"], [gx], train,
                                                  shadow_xs=[x])
            y = ys[0]
        else:
            mult = (v1.constant(data["multiplier"])
                    if case["multiplier"] else None)
            y, importance, load, _, _ = moe.Eval(
                x, train, per_example_multiplier=mult)
        assert len(captured) == 1, captured
        gates, gating_load = captured[0]

        noise_ops = [op for op in graph.get_operations()
                     if op.type == "RandomStandardNormal"]
        assert len(noise_ops) == (1 if case["noisy"] else 0), noise_ops

        aux = case["loss_coef"] * (module.CVSquared(importance) +
                                   module.CVSquared(load))
        loss = tf.reduce_sum(tf.square(y)) + aux

        wvars = {"gate_kernel": gating._w_gate}
        if case["noisy"]:
            wvars["noise_kernel"] = gating._w_noise
        num_layers = len(layer_sizes(case)) - 1
        for l in range(num_layers):
            wvars["kernel_%d" % l] = [experts[i].vars[l] for i in range(n)]

        names = weight_names(case)
        flat_vars, spans = [], {}
        for name in names:
            v = wvars[name]
            vs = v if isinstance(v, list) else [v]
            spans[name] = (len(flat_vars), len(flat_vars) + len(vs),
                           isinstance(v, list))
            flat_vars.extend(vs)
        grads = v1.gradients(loss, flat_vars)

        gating_loss = (
            tf.reduce_sum(gates * v1.constant(data["gating_coef_gates"])) +
            tf.reduce_sum(gating_load * v1.constant(data["gating_coef_load"])))
        gnames = gating_weight_names(case)
        gating_grads = v1.gradients(gating_loss, [wvars[w] for w in gnames])

        assigns, feeds = [], {}
        for name in names:
            start, stop, stacked = spans[name]
            for j, var in enumerate(flat_vars[start:stop]):
                value = data[name][j] if stacked else data[name]
                ph = v1.placeholder(tf.float32, value.shape)
                assigns.append(v1.assign(var, ph))
                feeds[ph] = value
        init = v1.global_variables_initializer()

        def zeros_if_none(g, var):
            return g if g is not None else tf.zeros_like(var)

        fetch = {
            "gates": gates,
            "load": gating_load,
            "moe_load": load,
            "importance": importance,
            "y": y,
            "aux_loss": aux,
        }
        for name in names:
            start, stop, stacked = spans[name]
            gs = [zeros_if_none(g, v) for g, v in
                  zip(grads[start:stop], flat_vars[start:stop])]
            fetch["grad/" + name] = tf.stack(gs) if stacked else gs[0]
        for name, g in zip(gnames, gating_grads):
            fetch["gating_grad/" + name] = zeros_if_none(g, wvars[name])

        config = v1.ConfigProto(intra_op_parallelism_threads=2,
                                inter_op_parallelism_threads=2)
        results = {}
        with v1.Session(graph=graph, config=config) as sess:
            sess.run(init)
            sess.run(assigns, feeds)
            for mode, training in MODES:
                feed = {train: training}
                if case["noisy"]:
                    feed[noise_ops[0].outputs[0]] = data["noise"]
                res = sess.run(fetch, feed)
                # The MoE's load is the gating network's load.
                np.testing.assert_array_equal(res.pop("moe_load"), res["load"])
                results[mode] = {key: np.asarray(val, np.float32)
                                 for key, val in res.items()}
    return results


# --------------------------------------------------------------------------
# Fixture file layout. One float32 blob per case (few zip members keeps the
# file small) plus a JSON index "__meta__": {"cases": [case, ...],
# "index": {case: [[key, offset, shape], ...]}}, where key is "data/<name>"
# or "<mode>/<name>".
# --------------------------------------------------------------------------


def pack(case_results, extra_meta=None):
    """{case_name: (data, {mode: results})} -> dict of arrays for np.savez."""
    flat, meta = {}, {"cases": [], "index": {}}
    meta.update(extra_meta or {})
    for name, (data, results) in case_results.items():
        items = [("data/" + key, val) for key, val in sorted(data.items())]
        for mode, res in results.items():
            items += [("%s/%s" % (mode, key), val)
                      for key, val in sorted(res.items())]
        index, parts, offset = [], [], 0
        for key, val in items:
            val = np.asarray(val, np.float32)
            index.append([key, offset, list(val.shape)])
            parts.append(val.reshape(-1))
            offset += val.size
        flat[name] = np.concatenate(parts)
        meta["cases"].append(CASES_BY_NAME[name])
        meta["index"][name] = index
    flat["__meta__"] = np.array(json.dumps(meta))
    return flat


def read_meta(npz):
    return json.loads(str(npz["__meta__"]))


def unpack(npz, case_name, meta=None):
    """Returns (case, data, {mode: results}) for one case, or None if absent.

    `case` is the case description stored with the fixtures.
    """
    meta = meta if meta is not None else read_meta(npz)
    if case_name not in meta["index"]:
        return None
    blob = npz[case_name]
    data, results = {}, {mode: {} for mode, _ in MODES}
    for key, offset, shape in meta["index"][case_name]:
        size = int(np.prod(shape, dtype=np.int64))
        val = blob[offset:offset + size].reshape(shape)
        group, name = key.split("/", 1)
        if group == "data":
            data[name] = val
        else:
            results[group][name] = val
    case = {c["name"]: c for c in meta["cases"]}[case_name]
    case = dict(case, hidden=tuple(case["hidden"]))
    return case, data, results
