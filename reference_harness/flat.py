"""The flat parity cases: the original's LocalMixtureOfExperts (or, with
`gating_inputs`, its DistributedMixtureOfExperts on one datashard) and its
NoisyTopKGating alone, against keras_moe's MixtureOfExperts and
NoisyTopKGating (tests/fixtures/parity.npz, tools/make_parity_fixtures.py,
tests/test_parity.py).
"""

import os

import numpy as np

from reference_harness import FIXTURES_DIR
from reference_harness.cases import (
    MODES, by_name, describe, f32, layer_sizes, num_layers, output_dim, rng)

FIXTURES = os.path.join(FIXTURES_DIR, "parity.npz")
TOOL = "tools/make_parity_fixtures.py"

DEFAULTS = dict(
    tokens=16,
    input_dim=8,
    num_experts=6,
    k=2,
    output_dim=None,
    hidden_sizes=(),
    autoscale=True,
    noisy_gating=True,
    noise_epsilon=1e-2,
    loss_coef=0.1,
    gate_multiplier=False,  # a per-token multiplier of the gates
    gating_inputs=False,  # the gate reads other inputs than the experts
)


def _case(name, **kwargs):
    return describe(DEFAULTS, name, kwargs)


CASES = [
    _case("noisy_k2"),
    _case("noisy_k1", k=1, tokens=12),
    _case("noisy_k_eq_n", num_experts=4, k=4, tokens=10),
    _case("noisy_k_eq_n_minus_1", num_experts=5, k=4, tokens=12),
    _case("noisy_k3_eps_coef1", input_dim=6, num_experts=6, k=3, tokens=10,
          noise_epsilon=0.05, loss_coef=1.0),
    _case("clean_k2", noisy_gating=False),
    _case("clean_k1", noisy_gating=False, k=1, num_experts=5),
    _case("clean_k_eq_n", noisy_gating=False, num_experts=4, k=4, tokens=10),
    _case("hidden_autoscale", hidden_sizes=(7, 5), k=3, tokens=14),
    _case("hidden_no_autoscale", hidden_sizes=(7, 5), k=3, autoscale=False,
          tokens=14),
    _case("hidden_clean_d6", hidden_sizes=(7, 5), input_dim=6, num_experts=5,
          k=2, noisy_gating=False),
    _case("output_dim", output_dim=5, hidden_sizes=(7,), num_experts=5, k=2),
    _case("output_dim_no_hidden", output_dim=11, input_dim=6, num_experts=4,
          k=2, tokens=12),
    _case("gate_multiplier", gate_multiplier=True, k=2),
    _case("gate_multiplier_hidden", gate_multiplier=True,
          hidden_sizes=(7, 5), k=3, num_experts=5, output_dim=6),
    _case("gating_inputs", gating_inputs=True, k=2),
    _case("gating_inputs_hidden", gating_inputs=True, hidden_sizes=(7, 5),
          k=3, output_dim=5, tokens=14),
    _case("gating_inputs_clean", gating_inputs=True, noisy_gating=False,
          num_experts=5, k=2),
]

CASES_BY_NAME = by_name(CASES)


def make_data(case):
    """Deterministic inputs, weights and noise for `case` (float32 numpy).

    x [T, d] (gating_x too with gating_inputs); multiplier [T] with
    gate_multiplier (one token's 0); noise [T, n] when noisy; gate_kernel,
    noise_kernel [d, n]; kernel_l [n, in_l, out_l]; gating_coef_gates
    [T, n] and gating_coef_load [n], the coefficients of the gating-alone
    loss sum(gates * C) + sum(load * L).
    """
    r = rng(case)
    t, d, n = case["tokens"], case["input_dim"], case["num_experts"]
    data = {}
    data["x"] = f32(r.normal(size=(t, d)))
    if case["gating_inputs"]:
        data["gating_x"] = f32(r.normal(size=(t, d)))
    if case["gate_multiplier"]:
        m = r.uniform(0.25, 2.0, size=(t,))
        m[t // 3] = 0.0  # one example switched off entirely
        data["multiplier"] = f32(m)
    if case["noisy_gating"]:
        data["noise"] = f32(r.normal(size=(t, n)))
    data["gate_kernel"] = f32(0.5 * r.normal(size=(d, n)))
    if case["noisy_gating"]:
        data["noise_kernel"] = f32(0.5 * r.normal(size=(d, n)))
    sizes = layer_sizes(case)
    for l in range(len(sizes) - 1):
        data["kernel_%d" % l] = f32(
            0.5 * r.normal(size=(n, sizes[l], sizes[l + 1])))
    data["gating_coef_gates"] = f32(r.normal(size=(t, n)))
    data["gating_coef_load"] = f32(r.normal(size=(n,)))
    return data


def weight_names(case):
    """The weights whose gradients are compared, as named in the data."""
    names = ["gate_kernel"]
    if case["noisy_gating"]:
        names.append("noise_kernel")
    names += ["kernel_%d" % l for l in range(num_layers(case))]
    return names


def gating_weight_names(case):
    return ["gate_kernel"] + (["noise_kernel"] if case["noisy_gating"]
                              else [])


def run_original(module, case, data):
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
    n, k, d = case["num_experts"], case["k"], case["input_dim"]
    noisy = case["noisy_gating"]
    out_dim = output_dim(case)
    graph = v1.Graph()
    with graph.as_default():
        gating_hp = module.NoisyTopKGatingParams()
        gating_hp.num_experts = n
        gating_hp.k = k
        gating_hp.noisy_gating = noisy
        gating_hp.noise_epsilon = case["noise_epsilon"]
        expert_hp = module.FeedForwardExpertParams()
        expert_hp.hidden_layer_sizes = list(case["hidden_sizes"]) or None
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
                    if case["gate_multiplier"] else None)
            y, importance, load, _, _ = moe.Eval(
                x, train, per_example_multiplier=mult)
        assert len(captured) == 1, captured
        gates, gating_load = captured[0]

        noise_ops = [op for op in graph.get_operations()
                     if op.type == "RandomStandardNormal"]
        assert len(noise_ops) == (1 if noisy else 0), noise_ops

        aux = case["loss_coef"] * (module.CVSquared(importance) +
                                   module.CVSquared(load))
        loss = tf.reduce_sum(tf.square(y)) + aux

        wvars = {"gate_kernel": gating._w_gate}
        if noisy:
            wvars["noise_kernel"] = gating._w_noise
        for l in range(num_layers(case)):
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

        # Grappler stays on here (as when the committed fixtures were
        # written): unlike original.session_config().
        config = v1.ConfigProto(intra_op_parallelism_threads=2,
                                inter_op_parallelism_threads=2)
        results = {}
        with v1.Session(graph=graph, config=config) as sess:
            sess.run(init)
            sess.run(assigns, feeds)
            for mode, training in MODES:
                feed = {train: training}
                if noisy:
                    feed[noise_ops[0].outputs[0]] = data["noise"]
                res = sess.run(fetch, feed)
                # The MoE's load is the gating network's load.
                np.testing.assert_array_equal(res.pop("moe_load"), res["load"])
                results[mode] = {key: np.asarray(val, np.float32)
                                 for key, val in res.items()}
    return results
