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
    return pack_cases(case_results, CASES_BY_NAME, extra_meta)


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


# ==========================================================================
# The original's DistributedMixtureOfExperts: hierarchical (a secondary
# LocalMixtureOfExperts per group) and flat, over one or several datashards
# on one CPU device. Used by tools/make_hierarchical_fixtures.py,
# tests/test_parity_hierarchical.py, tools/make_checkpoint_fixtures.py and
# tests/test_compat.py.
# ==========================================================================

HIER_DEFAULT_FIXTURES = os.path.join(REPO_ROOT, "tests", "fixtures",
                                     "parity_hierarchical.npz")

_HIER_DEFAULTS = dict(
    tokens=12,
    d=6,
    n1=3,  # groups (primary experts)
    n2=4,  # experts per group; None: the flat DistributedMixtureOfExperts
    k=2,
    group_k=2,
    output_dim=None,
    hidden=(),
    autoscale=True,
    noisy=True,
    noise_epsilon=1e-2,
    loss_coef=0.1,
    gating_inputs=False,  # the primary gate reads xs, the rest shadow_xs
    shards=None,  # datashard sizes (row order); None: one datashard
    empty_group=False,  # data that routes no token to the last group
)


def _hier_case(name, **kwargs):
    c = dict(_HIER_DEFAULTS)
    unknown = set(kwargs) - set(c)
    assert not unknown, unknown
    c.update(kwargs)
    c["name"] = name
    c["hidden"] = tuple(c["hidden"])
    if c["shards"] is None:
        c["shards"] = (c["tokens"],)
    c["shards"] = tuple(c["shards"])
    assert sum(c["shards"]) == c["tokens"], c
    return c


HIER_CASES = [
    _hier_case("h_noisy_k2"),
    _hier_case("h_noisy_k2_3shards", shards=(5, 3, 4)),
    _hier_case("h_noisy_k1_gk1", k=1, group_k=1, shards=(4, 4, 4)),
    _hier_case("h_noisy_k_eq_n", n1=3, n2=3, k=3, group_k=3, tokens=10,
               shards=(6, 4)),
    _hier_case("h_noisy_k1_gk_eq_n", k=1, group_k=4, shards=(3, 5, 4)),
    _hier_case("h_noisy_k_eq_n_gk1", k=3, group_k=1, tokens=9),
    _hier_case("h_noisy_eps_coef1", n1=4, n2=2, k=2, group_k=1,
               noise_epsilon=0.05, loss_coef=1.0, tokens=14,
               shards=(7, 7)),
    _hier_case("h_empty_group", n1=4, n2=3, k=2, group_k=2,
               empty_group=True, shards=(4, 4, 4)),
    _hier_case("h_clean_k2", noisy=False, shards=(5, 3, 4)),
    _hier_case("h_clean_k1_gk_eq_n", noisy=False, k=1, group_k=4),
    _hier_case("h_clean_k_eq_n_gk1", noisy=False, k=3, group_k=1,
               shards=(6, 6)),
    _hier_case("h_hidden", hidden=(7, 5), output_dim=5, shards=(5, 3, 4)),
    _hier_case("h_hidden_no_autoscale", hidden=(7,), autoscale=False,
               k=1, group_k=3),
    _hier_case("h_gating_inputs", gating_inputs=True, hidden=(7,),
               shards=(5, 3, 4)),
    _hier_case("h_gating_inputs_clean", gating_inputs=True, noisy=False,
               output_dim=4, shards=(6, 6)),
    # The flat DistributedMixtureOfExperts over several datashards.
    _hier_case("flat_3shards", n1=5, n2=None, k=2, shards=(5, 3, 4)),
    _hier_case("flat_3shards_clean_k1", n1=5, n2=None, k=1, noisy=False,
               shards=(5, 3, 4)),
    _hier_case("flat_gating_inputs_hidden_2shards", n1=4, n2=None, k=3,
               gating_inputs=True, hidden=(7,), output_dim=5,
               shards=(6, 6)),
]

HIER_CASES_BY_NAME = {c["name"]: c for c in HIER_CASES}


def is_hierarchical(case):
    return case["n2"] is not None


def hier_num_experts(case):
    return case["n1"] * (case["n2"] if is_hierarchical(case) else 1)


def hier_shard_slices(case):
    out, start = [], 0
    for size in case["shards"]:
        out.append(slice(start, start + size))
        start += size
    return out


def hier_weight_names(case):
    names = ["primary_gate_kernel"]
    if case["noisy"]:
        names.append("primary_noise_kernel")
    if is_hierarchical(case):
        names.append("secondary_gate_kernel")
        if case["noisy"]:
            names.append("secondary_noise_kernel")
    names += ["kernel_%d" % l for l in range(len(layer_sizes(case)) - 1)]
    return names


def make_hier_case_data(case):
    """Deterministic inputs, weights and noise draws for a hierarchical case.

    Weights: primary_gate_kernel / primary_noise_kernel [d, n1];
    secondary_gate_kernel / secondary_noise_kernel [n1, d, n2];
    kernel_l [n1, n2, in_l, out_l] ([n1, in_l, out_l] when flat).
    Draws: primary_noise [T, n1]; secondary_noise [T, n1, n2] (group i
    reads secondary_noise[rows_i, i] for the rows it receives).
    """
    rng = np.random.RandomState(zlib.crc32(case["name"].encode()) & 0x7FFFFFFF)
    t, d, n1, n2 = case["tokens"], case["d"], case["n1"], case["n2"]
    hier = is_hierarchical(case)
    f32 = lambda a: np.asarray(a, np.float32)
    data = {}
    data["x"] = f32(rng.normal(size=(t, d)))
    if case["gating_inputs"]:
        data["gating_x"] = f32(rng.normal(size=(t, d)))
    if case["noisy"]:
        data["primary_noise"] = f32(rng.normal(size=(t, n1)))
        if hier:
            data["secondary_noise"] = f32(rng.normal(size=(t, n1, n2)))
    data["primary_gate_kernel"] = f32(0.5 * rng.normal(size=(d, n1)))
    if case["noisy"]:
        data["primary_noise_kernel"] = f32(0.5 * rng.normal(size=(d, n1)))
    if hier:
        data["secondary_gate_kernel"] = f32(0.5 * rng.normal(size=(n1, d, n2)))
        if case["noisy"]:
            data["secondary_noise_kernel"] = f32(
                0.5 * rng.normal(size=(n1, d, n2)))
    lead = (n1, n2) if hier else (n1,)
    sizes = layer_sizes(case)
    for l in range(len(sizes) - 1):
        data["kernel_%d" % l] = f32(
            0.5 * rng.normal(size=lead + (sizes[l], sizes[l + 1])))
    if case["empty_group"]:
        # The primary gate reads a first feature >= 2 and weighs it -20 for
        # the last group: that group's logit is far below every other one,
        # noise included, so no token reaches it.
        gx = "gating_x" if case["gating_inputs"] else "x"
        data[gx][:, 0] = np.abs(data[gx][:, 0]) + 2.0
        data["primary_gate_kernel"][0, -1] = -20.0
    return data


def build_original_moe(module, kind, config, name="moe"):
    """Builds the original's MoE in the current graph.

    kind: "local" (LocalMixtureOfExperts), "distributed" (flat
    DistributedMixtureOfExperts) or "hierarchical". config: d, n1, n2, k,
    group_k, hidden, output_dim, autoscale, noisy, noise_epsilon (a case).
    Returns (moe, weight_vars): weight_vars maps the names of
    hier_weight_names (for "local": gate/noise are primary_*) to a variable
    or (nested) lists of variables stacked as in make_hier_case_data.
    """
    d, n1 = config["d"], config["n1"]

    def gating_hp(n, k):
        hp = module.NoisyTopKGatingParams()
        hp.num_experts = n
        hp.k = k
        hp.noisy_gating = config["noisy"]
        hp.noise_epsilon = config["noise_epsilon"]
        return hp

    expert_hp = module.FeedForwardExpertParams()
    expert_hp.hidden_layer_sizes = list(config["hidden"]) or None
    expert_hp.autoscale = config["autoscale"]
    out_dim = output_dim(config)
    num_layers = len(layer_sizes(config)) - 1
    wvars = {}
    if kind == "local":
        moe = module.LocalMixtureOfExperts(gating_hp(n1, config["k"]),
                                           expert_hp, d, out_dim, name)
        primary = moe._gating
        experts = moe._experts
    elif kind == "distributed":
        moe = module.DistributedMixtureOfExperts(
            gating_hp(n1, config["k"]), None, expert_hp, d, out_dim,
            ["/cpu:0"], name)
        primary = moe._primary_gating
        experts = moe._experts
    elif kind == "hierarchical":
        moe = module.DistributedMixtureOfExperts(
            gating_hp(n1, config["k"]),
            gating_hp(config["n2"], config["group_k"]), expert_hp, d,
            out_dim, ["/cpu:0"], name)
        primary = moe._primary_gating
        experts = None
    else:
        raise ValueError(kind)
    wvars["primary_gate_kernel"] = primary._w_gate
    if config["noisy"]:
        wvars["primary_noise_kernel"] = primary._w_noise
    if experts is not None:
        for l in range(num_layers):
            wvars["kernel_%d" % l] = [e.vars[l] for e in experts]
    else:
        groups = moe._secondary_moe
        wvars["secondary_gate_kernel"] = [g._gating._w_gate for g in groups]
        if config["noisy"]:
            wvars["secondary_noise_kernel"] = [
                g._gating._w_noise for g in groups]
        for l in range(num_layers):
            wvars["kernel_%d" % l] = [[e.vars[l] for e in g._experts]
                                      for g in groups]
    return moe, wvars


def _flatten_vars(v):
    """(list of variables, index tuples) of a nested list, depth first."""
    if not isinstance(v, list):
        return [v], [()]
    out, idx = [], []
    for i, item in enumerate(v):
        vs, ids = _flatten_vars(item)
        out += vs
        idx += [(i,) + j for j in ids]
    return out, idx


def assign_original_weights(wvars, data, names):
    """(assign ops, feed dict) setting wvars[name] to data[name]."""
    import tensorflow as tf

    v1 = tf.compat.v1
    assigns, feeds = [], {}
    for name in names:
        vs, ids = _flatten_vars(wvars[name])
        for var, ix in zip(vs, ids):
            value = data[name][ix] if ix else data[name]
            ph = v1.placeholder(tf.float32, value.shape)
            assigns.append(v1.assign(var, ph))
            feeds[ph] = value
    return assigns, feeds


def _capture_gating(graph, gating, records):
    """Records (gates, load, [RandomStandardNormal ops]) per gating call."""
    original_eval = gating.Eval

    def capturing_eval(*args, **kwargs):
        start = len(graph.get_operations())
        gates, load = original_eval(*args, **kwargs)
        ops = [op for op in graph.get_operations()[start:]
               if op.type == "RandomStandardNormal"]
        records.append((gates, load, ops))
        return gates, load

    gating.Eval = capturing_eval


def oracle_session_config():
    """Session config: two threads, no graph rewriting (Grappler) -- the
    graphs run once, so optimizing them only costs time."""
    import tensorflow as tf

    config = tf.compat.v1.ConfigProto(intra_op_parallelism_threads=2,
                                      inter_op_parallelism_threads=2)
    config.graph_options.rewrite_options.disable_meta_optimizer = True
    return config


def run_hier_oracle(module, case, data):
    """Runs a hierarchical (or flat distributed) case through the original.

    DistributedMixtureOfExperts over len(case["shards"]) datashards (rows of
    x in order), all on /cpu:0, in training and in inference. Returns
    {mode: results}; results has
      gates         [T, E]  combined gates primary[b, i] * secondary_i[b, j]
                            at column i * n2 + j (flat: the primary gates)
      importance    [n1, n2] ([n1] flat), load (same shape)
      y             [T, o]
      aux_loss      loss_coef * (CVSquared(importance) + CVSquared(load))
      expert_gates  the original's expert_to_gates, concatenated
      token_index   the original's expert_to_identifiers (identifiers: the
                    row of each token), concatenated
      grad/<w>      d(sum(y**2) + aux_loss)/dw, w in hier_weight_names
    """
    import tensorflow as tf

    v1 = tf.compat.v1
    hier = is_hierarchical(case)
    n1, n2 = case["n1"], case["n2"]
    slices = hier_shard_slices(case)
    num_shards = len(slices)
    devices = ["/cpu:0"] * num_shards
    graph = v1.Graph()
    with graph.as_default():
        moe, wvars = build_original_moe(
            module, "hierarchical" if hier else "distributed", case)
        primary_records, secondary_records = [], []
        _capture_gating(graph, moe._primary_gating, primary_records)
        if hier:
            group_records = [[] for _ in range(n1)]
            for g, rec in zip(moe._secondary_moe, group_records):
                _capture_gating(graph, g._gating, rec)

        train = v1.placeholder(tf.bool, [], name="train")
        xs = [v1.constant(data["x"][s]) for s in slices]
        ids = [v1.constant(np.arange(s.start, s.stop, dtype=np.int64))
               for s in slices]
        if case["gating_inputs"]:
            gxs = [v1.constant(data["gating_x"][s]) for s in slices]
            ys, importance, load, e2i, e2g = moe.Eval(
                devices, gxs, train, identifiers=ids, shadow_xs=xs)
        else:
            ys, importance, load, e2i, e2g = moe.Eval(
                devices, xs, train, identifiers=ids)
        y = tf.concat(ys, 0)
        assert len(primary_records) == num_shards, primary_records
        if hier:
            assert all(len(r) == 1 for r in group_records), group_records
            secondary_records = [r[0] for r in group_records]
        noise_ops = [op for op in graph.get_operations()
                     if op.type == "RandomStandardNormal"]
        expected = (num_shards + (n1 if hier else 0)) if case["noisy"] else 0
        assert len(noise_ops) == expected, noise_ops
        for rec in primary_records + secondary_records:
            assert len(rec[2]) == (1 if case["noisy"] else 0), rec

        aux = case["loss_coef"] * (module.CVSquared(importance) +
                                   module.CVSquared(load))
        loss = tf.reduce_sum(tf.square(y)) + aux
        names = hier_weight_names(case)
        flat_vars, spans = [], {}
        for name in names:
            vs, _ = _flatten_vars(wvars[name])
            spans[name] = (len(flat_vars), len(flat_vars) + len(vs))
            flat_vars.extend(vs)
        grads = v1.gradients(loss, flat_vars)
        assigns, feeds = assign_original_weights(wvars, data, names)
        init = v1.global_variables_initializer()

        fetch = {
            "primary_gates": tf.concat([r[0] for r in primary_records], 0),
            "importance": importance,
            "load": load,
            "y": y,
            "aux_loss": aux,
            "expert_gates": tf.concat(e2g, 0),
            "token_index": tf.cast(tf.concat(e2i, 0), tf.float32),
        }
        if hier:
            fetch["secondary_gates"] = [r[0] for r in secondary_records]
        for name in names:
            start, stop = spans[name]
            gs = [g if g is not None else tf.zeros_like(v)
                  for g, v in zip(grads[start:stop], flat_vars[start:stop])]
            g = tf.stack(gs)
            fetch["grad/" + name] = tf.reshape(
                g, data[name].shape)

        results = {}
        with v1.Session(graph=graph, config=oracle_session_config()) as sess:
            sess.run(init)
            sess.run(assigns, feeds)
            for mode, training in MODES:
                feed = {train: training}
                if case["noisy"]:
                    for s, rec in zip(slices, primary_records):
                        feed[rec[2][0].outputs[0]] = data["primary_noise"][s]
                # The primary gates first: they say which rows reach each
                # group, i.e. which rows of the secondary draw to feed.
                primary_gates = sess.run(fetch["primary_gates"], feed)
                rows = [np.nonzero(primary_gates[:, i] > 0)[0]
                        for i in range(n1)]
                if hier and case["noisy"]:
                    for i, rec in enumerate(secondary_records):
                        feed[rec[2][0].outputs[0]] = (
                            data["secondary_noise"][rows[i], i])
                res = sess.run(fetch, feed)
                np.testing.assert_array_equal(res.pop("primary_gates"),
                                              primary_gates)
                if hier:
                    gates = np.zeros((case["tokens"], n1 * n2), np.float32)
                    for i, sg in enumerate(res.pop("secondary_gates")):
                        gates[rows[i], i * n2:(i + 1) * n2] = (
                            primary_gates[rows[i], i:i + 1] * sg)
                else:
                    gates = primary_gates
                res["gates"] = gates
                results[mode] = {key: np.asarray(val, np.float32)
                                 for key, val in res.items()}
    return results


def pack_cases(case_results, cases_by_name, extra_meta=None):
    """{case_name: (data, {mode: results})} -> dict of arrays for np.savez,
    the cases described from `cases_by_name`."""
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
        meta["cases"].append(cases_by_name[name])
        meta["index"][name] = index
    flat["__meta__"] = np.array(json.dumps(meta))
    return flat


def unpack_hier(npz, case_name, meta=None):
    """`unpack` for parity_hierarchical.npz (tuples restored)."""
    got = unpack(npz, case_name, meta)
    if got is None:
        return None
    case, data, results = got
    return dict(case, shards=tuple(case["shards"])), data, results


# --------------------------------------------------------------------------
# TF1 checkpoints written by the original (tools/make_checkpoint_fixtures.py,
# tests/test_compat.py).
# --------------------------------------------------------------------------

CHECKPOINT_DIR = os.path.join(REPO_ROOT, "tests", "fixtures",
                              "tf1_checkpoints")
CHECKPOINT_OUTPUTS = os.path.join(CHECKPOINT_DIR, "outputs.npz")
CHECKPOINT_STEP = 1000

# kind -> the configuration of the original's MoE (a hierarchical case
# description; make_hier_case_data gives its input batch and weights).
# "local": LocalMixtureOfExperts; "distributed": flat
# DistributedMixtureOfExperts; "hierarchical": DistributedMixtureOfExperts
# with a secondary gating. All named "moe".
CHECKPOINT_CASES = {
    "local": _hier_case("ckpt_local", n1=4, n2=None, k=2, hidden=(5,),
                        output_dim=3, tokens=10),
    "distributed": _hier_case("ckpt_distributed", n1=3, n2=None, k=2,
                              output_dim=4, tokens=10, shards=(6, 4)),
    "hierarchical": _hier_case("ckpt_hierarchical", n1=3, n2=2, k=2,
                               group_k=1, hidden=(4,), tokens=10,
                               shards=(6, 4)),
}
# The committed checkpoints (tests/fixtures/tf1_checkpoints/<kind>/).
COMMITTED_CHECKPOINT_KINDS = ("local", "hierarchical")


def write_original_checkpoint(module, kind, directory, case=None, data=None,
                              name="moe"):
    """Writes a TF1 checkpoint of the original's MoE with tf.compat.v1.

    Builds CHECKPOINT_CASES[kind] (or `case`) with the original, sets its
    variables to make_hier_case_data's weights (or `data`'s), adds a
    `global_step` (= CHECKPOINT_STEP), and saves everything with
    `tf.compat.v1.train.Saver(save_relative_paths=True)` as
    `<directory>/model.ckpt-<step>` (.index and .data; the `checkpoint`
    state file too; no .meta graph).
    Returns (prefix, {"x", "y", "importance", "load"}): the input batch and
    the original's inference outputs on it (datashards as case["shards"]).
    """
    import tensorflow as tf

    v1 = tf.compat.v1
    case = case if case is not None else CHECKPOINT_CASES[kind]
    data = data if data is not None else make_hier_case_data(case)
    graph = v1.Graph()
    with graph.as_default():
        moe, wvars = build_original_moe(module, kind, case, name=name)
        step = v1.train.get_or_create_global_step()
        if kind == "local":
            y, importance, load, _, _ = moe.Eval(v1.constant(data["x"]),
                                                 False)
        else:
            slices = hier_shard_slices(case)
            ys, importance, load, _, _ = moe.Eval(
                ["/cpu:0"] * len(slices),
                [v1.constant(data["x"][s]) for s in slices], False)
            y = tf.concat(ys, 0)
        names = [n for n in hier_weight_names(case) if n in wvars]
        assert sorted(names) == sorted(wvars), (names, sorted(wvars))
        assigns, feeds = assign_original_weights(wvars, data, names)
        assigns.append(v1.assign(step, CHECKPOINT_STEP))
        init = v1.global_variables_initializer()
        saver = v1.train.Saver(save_relative_paths=True)
        with v1.Session(graph=graph, config=oracle_session_config()) as sess:
            sess.run(init)
            sess.run(assigns, feeds)
            out = sess.run({"y": y, "importance": importance, "load": load})
            os.makedirs(directory, exist_ok=True)
            prefix = saver.save(sess, os.path.join(directory, "model.ckpt"),
                                global_step=CHECKPOINT_STEP,
                                write_meta_graph=False)
    out = {k: np.asarray(v, np.float32) for k, v in out.items()}
    out["x"] = data["x"]
    return prefix, out


# --------------------------------------------------------------------------
# The sharded embedding and the sampled softmax: the original's
# ParallelEmbeddingLookup, SampledSoftmaxLoss and ParallelSampledSoftmaxLoss
# (tools/make_embedding_fixtures.py, tests/test_embedding.py,
# tests/test_sampled_softmax.py).
# --------------------------------------------------------------------------

EMBEDDING_FIXTURES = os.path.join(REPO_ROOT, "tests", "fixtures",
                                  "embedding_softmax.npz")

# Lookups: a table of `vocab` rows of width `depth`, mod-sharded over
# `num_shards` variables, looked up by `len(datashards)` datashards of ids
# (sizes as given; every datashard repeats ids).
EMBEDDING_CASES = [
    dict(name="emb_multiple", kind="embedding", vocab=12, depth=5,
         num_shards=3, datashards=(9,)),
    dict(name="emb_not_multiple", kind="embedding", vocab=10, depth=4,
         num_shards=3, datashards=(8, 11)),
    dict(name="emb_not_multiple_4shards", kind="embedding", vocab=11,
         depth=3, num_shards=4, datashards=(7, 5, 9)),
    dict(name="emb_one_shard", kind="embedding", vocab=7, depth=4,
         num_shards=1, datashards=(6, 6)),
]

# Sampled softmax over `vocab` classes (class table mod-sharded over
# `num_shards`), `num_sampled` fixed sampled classes per datashard. In each
# datashard the first sampled class is a target of that datashard; in the
# last datashard one sampled class is drawn twice when `duplicate`.
SOFTMAX_CASES = [
    dict(name="ssm_not_multiple", kind="softmax", vocab=11, depth=5,
         num_shards=3, datashards=(6, 4), num_sampled=4, duplicate=False,
         weighted=True),
    dict(name="ssm_multiple_duplicate", kind="softmax", vocab=12, depth=4,
         num_shards=2, datashards=(5, 7), num_sampled=5, duplicate=True,
         weighted=True),
    dict(name="ssm_one_shard_unweighted", kind="softmax", vocab=9, depth=3,
         num_shards=1, datashards=(8,), num_sampled=3, duplicate=False,
         weighted=False),
]

EMBEDDING_SOFTMAX_CASES = EMBEDDING_CASES + SOFTMAX_CASES
EMBEDDING_SOFTMAX_CASES_BY_NAME = {c["name"]: c
                                   for c in EMBEDDING_SOFTMAX_CASES}


def log_uniform_expected_count(vocab, num_sampled):
    """`num_sampled * P(class)` of the log-uniform (Zipfian) distribution
    over `vocab` classes, float32 `[vocab]`: the expected counts the cases
    feed both implementations."""
    c = np.arange(vocab, dtype=np.float64)
    p = np.log((c + 2.0) / (c + 1.0)) / np.log(vocab + 1.0)
    return np.asarray(num_sampled * p, np.float32)


def make_embedding_case_data(case):
    """Deterministic table, ids (and for softmax cases features, targets,
    draws, weights) of an embedding or softmax case (numpy).

    Keys: table [vocab, depth]; per datashard i: ids_i / targets_i
    [size_i] (int32, with repeats); embedding: coef_i [size_i, depth]
    (the test loss is sum_i sum(emb_i * coef_i)); softmax: features_i
    [size_i, depth], sampled_i [num_sampled] (int32), weights_i [size_i];
    expected_count [vocab]."""
    rng = np.random.RandomState(zlib.crc32(case["name"].encode()) & 0x7FFFFFFF)
    f32 = lambda a: np.asarray(a, np.float32)
    v, d = case["vocab"], case["depth"]
    data = {"table": f32(0.5 * rng.normal(size=(v, d)))}
    for i, size in enumerate(case["datashards"]):
        ids = rng.randint(0, v, size=size)
        ids[size // 2] = ids[0]  # a repeated id in every datashard
        ids[-1] = v - 1  # the last id: in the last shard when not multiple
        if case["kind"] == "embedding":
            data["ids_%d" % i] = ids.astype(np.int32)
            data["coef_%d" % i] = f32(rng.normal(size=(size, d)))
            continue
        data["targets_%d" % i] = ids.astype(np.int32)
        data["features_%d" % i] = f32(rng.normal(size=(size, d)))
        sampled = rng.choice(
            [c for c in range(v) if c != ids[0]], case["num_sampled"],
            replace=False)
        sampled[0] = ids[0]  # a sampled class equal to a target (twice)
        if case["duplicate"] and i == len(case["datashards"]) - 1:
            sampled[-1] = sampled[1]
        data["sampled_%d" % i] = sampled.astype(np.int32)
        data["weights_%d" % i] = (
            f32(rng.uniform(0.0, 2.0, size=size)) if case["weighted"]
            else np.ones(size, np.float32))
    if case["kind"] == "softmax":
        data["expected_count"] = log_uniform_expected_count(
            v, case["num_sampled"])
    return data


class _FixedDrawSampler(object):
    """Stands in for the original's (unpublished) candidate sampler object:
    `sample()` returns the next fixed draw (one call per datashard, in
    order), `log_expected_count(classes)` reads a table of expected counts."""

    def __init__(self, draws, expected_count):
        import tensorflow as tf

        self._draws = list(draws)
        self._log_q = tf.math.log(tf.constant(expected_count))

    def sample(self):
        import tensorflow as tf

        return tf.constant(self._draws.pop(0))

    def log_expected_count(self, classes):
        import tensorflow as tf

        return tf.gather(self._log_q, classes)


def _full_table_order(per_shard, vocab):
    """Rows of a mod-sharded table (a list of [rows_s, ...]) in id order."""
    import tensorflow as tf

    n = len(per_shard)
    return tf.dynamic_stitch([tf.range(s, vocab, n) for s in range(n)],
                             per_shard)


def run_embedding_softmax_oracle(module, case, data):
    """Runs an embedding or softmax case through the original.

    The table's shards are `v1` variables holding table[s::num_shards] (the
    original's mod sharding; for a vocabulary that is not a multiple of the
    shard count the first shards have one row more), all on /cpu:0; one
    datashard per entry of case["datashards"].

    Returns {"ref": results}; results has
      embedding: emb_i [size_i, depth] from ParallelEmbeddingLookup;
        grad/table [vocab, depth], d(sum_i sum(emb_i * coef_i))/d table.
      softmax: loss_i [size_i], SampledSoftmaxLoss of datashard i (target
        and sampled rows from ParallelEmbeddingLookup); total, the
        ParallelSampledSoftmaxLoss with target_weights; grad/table and
        grad/features_i, d total / d (table, features_i).
    """
    import tensorflow as tf

    v1 = tf.compat.v1
    n, vocab = case["num_shards"], case["vocab"]
    num_datashards = len(case["datashards"])
    graph = v1.Graph()
    with graph.as_default():
        with v1.device("/cpu:0"):
            params = [
                v1.get_variable(
                    "shard_%d" % s,
                    initializer=v1.constant(data["table"][s::n]))
                for s in range(n)
            ]
        dp = module.Parallelism(["/cpu:0"] * num_datashards)
        fetch = {}
        if case["kind"] == "embedding":
            ids = [v1.constant(data["ids_%d" % i])
                   for i in range(num_datashards)]
            embs = module.ParallelEmbeddingLookup(params, ids, dp)
            loss = tf.add_n([
                tf.reduce_sum(e * v1.constant(data["coef_%d" % i]))
                for i, e in enumerate(embs)])
            for i, e in enumerate(embs):
                fetch["emb_%d" % i] = e
            wrt = list(params)
        else:
            draws = [data["sampled_%d" % i] for i in range(num_datashards)]
            features = [v1.constant(data["features_%d" % i])
                        for i in range(num_datashards)]
            targets = [v1.constant(data["targets_%d" % i])
                       for i in range(num_datashards)]
            weights = [v1.constant(data["weights_%d" % i])
                       for i in range(num_datashards)]
            total = module.ParallelSampledSoftmaxLoss(
                params, features, targets,
                _FixedDrawSampler(draws, data["expected_count"]), vocab, dp,
                target_weights=weights)
            # Per-example losses: the original's SampledSoftmaxLoss on the
            # same draws and the same looked-up rows.
            sampler = _FixedDrawSampler(draws, data["expected_count"])
            sampled = dp(sampler.sample)
            sampled_params = module.ParallelEmbeddingLookup(params, sampled,
                                                            dp)
            target_params = module.ParallelEmbeddingLookup(params, targets,
                                                           dp)
            per_example = dp(module.SampledSoftmaxLoss, features, sampler,
                             vocab, targets, target_params, sampled,
                             sampled_params)
            for i, l in enumerate(per_example):
                fetch["loss_%d" % i] = l
            fetch["total"] = total
            loss = total
            wrt = list(params) + features
        grads = v1.gradients(loss, wrt)
        grads = [tf.convert_to_tensor(g) for g in grads]
        fetch["grad/table"] = _full_table_order(grads[:n], vocab)
        if case["kind"] == "softmax":
            for i in range(num_datashards):
                fetch["grad/features_%d" % i] = grads[n + i]
        init = v1.global_variables_initializer()
        with v1.Session(graph=graph, config=oracle_session_config()) as sess:
            sess.run(init)
            res = sess.run(fetch)
    return {"ref": {k: np.asarray(v, np.float32) for k, v in res.items()}}


def pack_embedding_softmax(case_results, extra_meta=None):
    """{name: (data, results)} -> arrays for np.savez: `name/data/key`,
    `name/ref/key`, and `__meta__` (JSON: the cases, `extra_meta`)."""
    flat = {}
    meta = {"cases": []}
    meta.update(extra_meta or {})
    for name, (data, results) in case_results.items():
        meta["cases"].append(EMBEDDING_SOFTMAX_CASES_BY_NAME[name])
        for key, val in data.items():
            flat["%s/data/%s" % (name, key)] = val
        for key, val in results["ref"].items():
            flat["%s/ref/%s" % (name, key)] = val
    flat["__meta__"] = np.array(json.dumps(meta))
    return flat


def unpack_embedding_softmax(npz, name):
    """(case, data, {"ref": results}) of `name` from a packed npz, or None."""
    meta = json.loads(str(npz["__meta__"]))
    cases = {c["name"]: c for c in meta["cases"]}
    if name not in cases:
        return None
    case = dict(cases[name], datashards=tuple(cases[name]["datashards"]))
    data, ref = {}, {}
    for key in npz.files:
        parts = key.split("/", 2)
        if len(parts) == 3 and parts[0] == name:
            (data if parts[1] == "data" else ref)[parts[2]] = npz[key]
    return case, data, {"ref": ref}
