"""The original's DistributedMixtureOfExperts: hierarchical (a secondary
LocalMixtureOfExperts per group) and flat, over one or several datashards
on one CPU device, against keras_moe's HierarchicalMixtureOfExperts and
MixtureOfExperts (tests/fixtures/parity_hierarchical.npz,
tools/make_hierarchical_fixtures.py, tests/test_parity.py); and building the
original's MoEs and setting their weights, for the checkpoints and the
benchmarks too.

A hierarchical case has `num_groups`, `experts_per_group` and `group_k`
(HierarchicalMixtureOfExperts' arguments) and `num_experts=None`; a flat
one has `num_experts` (MixtureOfExperts') and the other three None.
"""

import os

import numpy as np

from reference_harness import FIXTURES_DIR
from reference_harness.cases import (
    MODES, by_name, describe, f32, layer_sizes, num_layers, output_dim, rng)
from reference_harness.original import session_config

FIXTURES = os.path.join(FIXTURES_DIR, "parity_hierarchical.npz")
TOOL = "tools/make_hierarchical_fixtures.py"

DEFAULTS = dict(
    tokens=12,
    input_dim=6,
    num_experts=None,  # flat: the number of experts
    num_groups=3,  # hierarchical: groups (the primary gate's experts)
    experts_per_group=4,
    group_k=2,
    k=2,
    output_dim=None,
    hidden_sizes=(),
    autoscale=True,
    noisy_gating=True,
    noise_epsilon=1e-2,
    loss_coef=0.1,
    gating_inputs=False,  # the primary gate reads xs, the rest shadow_xs
    datashards=None,  # datashard sizes (row order); None: one datashard
    empty_group=False,  # data that routes no token to the last group
)


def make_case(name, **kwargs):
    """A case description: hierarchical, or flat when `num_experts` is
    given."""
    if kwargs.get("num_experts") is not None:
        kwargs = dict(dict(num_groups=None, experts_per_group=None,
                           group_k=None), **kwargs)
    c = describe(DEFAULTS, name, kwargs)
    if c["datashards"] is None:
        c["datashards"] = (c["tokens"],)
    assert sum(c["datashards"]) == c["tokens"], c
    hierarchical = c["experts_per_group"] is not None
    assert (c["num_experts"] is None) == hierarchical, c
    return c


_case = make_case

CASES = [
    _case("h_noisy_k2"),
    _case("h_noisy_k2_3shards", datashards=(5, 3, 4)),
    _case("h_noisy_k1_gk1", k=1, group_k=1, datashards=(4, 4, 4)),
    _case("h_noisy_k_eq_n", num_groups=3, experts_per_group=3, k=3,
          group_k=3, tokens=10, datashards=(6, 4)),
    _case("h_noisy_k1_gk_eq_n", k=1, group_k=4, datashards=(3, 5, 4)),
    _case("h_noisy_k_eq_n_gk1", k=3, group_k=1, tokens=9),
    _case("h_noisy_eps_coef1", num_groups=4, experts_per_group=2, k=2,
          group_k=1, noise_epsilon=0.05, loss_coef=1.0, tokens=14,
          datashards=(7, 7)),
    _case("h_empty_group", num_groups=4, experts_per_group=3, k=2,
          group_k=2, empty_group=True, datashards=(4, 4, 4)),
    _case("h_clean_k2", noisy_gating=False, datashards=(5, 3, 4)),
    _case("h_clean_k1_gk_eq_n", noisy_gating=False, k=1, group_k=4),
    _case("h_clean_k_eq_n_gk1", noisy_gating=False, k=3, group_k=1,
          datashards=(6, 6)),
    _case("h_hidden", hidden_sizes=(7, 5), output_dim=5,
          datashards=(5, 3, 4)),
    _case("h_hidden_no_autoscale", hidden_sizes=(7,), autoscale=False, k=1,
          group_k=3),
    _case("h_gating_inputs", gating_inputs=True, hidden_sizes=(7,),
          datashards=(5, 3, 4)),
    _case("h_gating_inputs_clean", gating_inputs=True, noisy_gating=False,
          output_dim=4, datashards=(6, 6)),
    # The flat DistributedMixtureOfExperts over several datashards.
    _case("flat_3shards", num_experts=5, k=2, datashards=(5, 3, 4)),
    _case("flat_3shards_clean_k1", num_experts=5, k=1, noisy_gating=False,
          datashards=(5, 3, 4)),
    _case("flat_gating_inputs_hidden_2shards", num_experts=4, k=3,
          gating_inputs=True, hidden_sizes=(7,), output_dim=5,
          datashards=(6, 6)),
]

CASES_BY_NAME = by_name(CASES)


def is_hierarchical(case):
    return case["experts_per_group"] is not None


def primary_experts(case):
    """The primary gate's experts: the groups, or the flat MoE's experts."""
    return case["num_groups"] if is_hierarchical(case) else case["num_experts"]


def shard_slices(case):
    """The rows of each datashard."""
    out, start = [], 0
    for size in case["datashards"]:
        out.append(slice(start, start + size))
        start += size
    return out


def weight_names(case):
    names = ["primary_gate_kernel"]
    if case["noisy_gating"]:
        names.append("primary_noise_kernel")
    if is_hierarchical(case):
        names.append("secondary_gate_kernel")
        if case["noisy_gating"]:
            names.append("secondary_noise_kernel")
    names += ["kernel_%d" % l for l in range(num_layers(case))]
    return names


def make_data(case):
    """Deterministic inputs, weights and noise draws for a case.

    Weights: primary_gate_kernel / primary_noise_kernel [d, n1];
    secondary_gate_kernel / secondary_noise_kernel [n1, d, n2];
    kernel_l [n1, n2, in_l, out_l] ([n1, in_l, out_l] when flat), n1 the
    groups (flat: the experts), n2 the experts per group.
    Draws: primary_noise [T, n1]; secondary_noise [T, n1, n2] (group i
    reads secondary_noise[rows_i, i] for the rows it receives).
    """
    r = rng(case)
    t, d = case["tokens"], case["input_dim"]
    n1, n2 = primary_experts(case), case["experts_per_group"]
    hier = is_hierarchical(case)
    noisy = case["noisy_gating"]
    data = {}
    data["x"] = f32(r.normal(size=(t, d)))
    if case["gating_inputs"]:
        data["gating_x"] = f32(r.normal(size=(t, d)))
    if noisy:
        data["primary_noise"] = f32(r.normal(size=(t, n1)))
        if hier:
            data["secondary_noise"] = f32(r.normal(size=(t, n1, n2)))
    data["primary_gate_kernel"] = f32(0.5 * r.normal(size=(d, n1)))
    if noisy:
        data["primary_noise_kernel"] = f32(0.5 * r.normal(size=(d, n1)))
    if hier:
        data["secondary_gate_kernel"] = f32(0.5 * r.normal(size=(n1, d, n2)))
        if noisy:
            data["secondary_noise_kernel"] = f32(
                0.5 * r.normal(size=(n1, d, n2)))
    lead = (n1, n2) if hier else (n1,)
    sizes = layer_sizes(case)
    for l in range(len(sizes) - 1):
        data["kernel_%d" % l] = f32(
            0.5 * r.normal(size=lead + (sizes[l], sizes[l + 1])))
    if case["empty_group"]:
        # The primary gate reads a first feature >= 2 and weighs it -20 for
        # the last group: that group's logit is far below every other one,
        # noise included, so no token reaches it.
        gx = "gating_x" if case["gating_inputs"] else "x"
        data[gx][:, 0] = np.abs(data[gx][:, 0]) + 2.0
        data["primary_gate_kernel"][0, -1] = -20.0
    return data


# --------------------------------------------------------------------------
# Building the original's MoE and setting its weights.
# --------------------------------------------------------------------------


def build_original_moe(module, kind, config, name="moe"):
    """Builds the original's MoE in the current graph.

    kind: "local" (LocalMixtureOfExperts), "distributed" (flat
    DistributedMixtureOfExperts) or "hierarchical". config: input_dim, k,
    hidden_sizes, output_dim, autoscale, noisy_gating, noise_epsilon, and
    num_experts (local, distributed) or num_groups, experts_per_group and
    group_k (hierarchical): a case, or those keys of one.
    Returns (moe, weight_vars): weight_vars maps the names of weight_names
    (for "local": gate/noise are primary_*) to a variable or (nested) lists
    of variables stacked as in make_data.
    """
    d = config["input_dim"]
    n1 = (config["num_groups"] if kind == "hierarchical"
          else config["num_experts"])

    def gating_hp(n, k):
        hp = module.NoisyTopKGatingParams()
        hp.num_experts = n
        hp.k = k
        hp.noisy_gating = config["noisy_gating"]
        hp.noise_epsilon = config["noise_epsilon"]
        return hp

    expert_hp = module.FeedForwardExpertParams()
    expert_hp.hidden_layer_sizes = list(config["hidden_sizes"]) or None
    expert_hp.autoscale = config["autoscale"]
    out_dim = output_dim(config)
    layers = num_layers(config)
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
            gating_hp(config["experts_per_group"], config["group_k"]),
            expert_hp, d, out_dim, ["/cpu:0"], name)
        primary = moe._primary_gating
        experts = None
    else:
        raise ValueError(kind)
    wvars["primary_gate_kernel"] = primary._w_gate
    if config["noisy_gating"]:
        wvars["primary_noise_kernel"] = primary._w_noise
    if experts is not None:
        for l in range(layers):
            wvars["kernel_%d" % l] = [e.vars[l] for e in experts]
    else:
        groups = moe._secondary_moe
        wvars["secondary_gate_kernel"] = [g._gating._w_gate for g in groups]
        if config["noisy_gating"]:
            wvars["secondary_noise_kernel"] = [
                g._gating._w_noise for g in groups]
        for l in range(layers):
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


# --------------------------------------------------------------------------
# Running a case.
# --------------------------------------------------------------------------


def run_original(module, case, data):
    """Runs a hierarchical (or flat distributed) case through the original.

    DistributedMixtureOfExperts over len(case["datashards"]) datashards
    (rows of x in order), all on /cpu:0, in training and in inference.
    Returns {mode: results}; results has
      gates         [T, E]  combined gates primary[b, i] * secondary_i[b, j]
                            at column i * n2 + j (flat: the primary gates)
      importance    [n1, n2] ([n1] flat), load (same shape)
      y             [T, o]
      aux_loss      loss_coef * (CVSquared(importance) + CVSquared(load))
      expert_gates  the original's expert_to_gates, concatenated
      token_index   the original's expert_to_identifiers (identifiers: the
                    row of each token), concatenated
      grad/<w>      d(sum(y**2) + aux_loss)/dw, w in weight_names
    """
    import tensorflow as tf

    v1 = tf.compat.v1
    hier = is_hierarchical(case)
    noisy = case["noisy_gating"]
    n1, n2 = primary_experts(case), case["experts_per_group"]
    slices = shard_slices(case)
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
        expected = (num_shards + (n1 if hier else 0)) if noisy else 0
        assert len(noise_ops) == expected, noise_ops
        for rec in primary_records + secondary_records:
            assert len(rec[2]) == (1 if noisy else 0), rec

        aux = case["loss_coef"] * (module.CVSquared(importance) +
                                   module.CVSquared(load))
        loss = tf.reduce_sum(tf.square(y)) + aux
        names = weight_names(case)
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
            fetch["grad/" + name] = tf.reshape(tf.stack(gs), data[name].shape)

        results = {}
        with v1.Session(graph=graph, config=session_config()) as sess:
            sess.run(init)
            sess.run(assigns, feeds)
            for mode, training in MODES:
                feed = {train: training}
                if noisy:
                    for s, rec in zip(slices, primary_records):
                        feed[rec[2][0].outputs[0]] = data["primary_noise"][s]
                # The primary gates first: they say which rows reach each
                # group, i.e. which rows of the secondary draw to feed.
                primary_gates = sess.run(fetch["primary_gates"], feed)
                rows = [np.nonzero(primary_gates[:, i] > 0)[0]
                        for i in range(n1)]
                if hier and noisy:
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
