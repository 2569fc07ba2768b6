"""TF1 checkpoints written by the original (tests/fixtures/tf1_checkpoints/,
tools/make_checkpoint_fixtures.py, tests/test_compat.py).
"""

import os

import numpy as np

from reference_harness import FIXTURES_DIR
from reference_harness.hierarchical import (
    assign_original_weights, build_original_moe, make_case, make_data,
    shard_slices, weight_names)
from reference_harness.original import session_config

DIRECTORY = os.path.join(FIXTURES_DIR, "tf1_checkpoints")
# The original's inference on each committed checkpoint (fixtures format:
# per case, data/x and ref/y, ref/importance, ref/load).
OUTPUTS = os.path.join(DIRECTORY, "outputs.npz")
STEP = 1000
TOOL = "tools/make_checkpoint_fixtures.py"

# kind -> the configuration of the original's MoE (a hierarchical.make_case
# description; hierarchical.make_data gives its input batch and weights).
# "local": LocalMixtureOfExperts; "distributed": flat
# DistributedMixtureOfExperts; "hierarchical": DistributedMixtureOfExperts
# with a secondary gating. All named "moe".
CASES = {
    "local": make_case("ckpt_local", num_experts=4, k=2, hidden_sizes=(5,),
                       output_dim=3, tokens=10),
    "distributed": make_case("ckpt_distributed", num_experts=3, k=2,
                             output_dim=4, tokens=10, datashards=(6, 4)),
    "hierarchical": make_case("ckpt_hierarchical", num_groups=3,
                              experts_per_group=2, k=2, group_k=1,
                              hidden_sizes=(4,), tokens=10,
                              datashards=(6, 4)),
}
# The committed checkpoints (tests/fixtures/tf1_checkpoints/<kind>/).
COMMITTED_KINDS = ("local", "hierarchical")


def prefix(kind, directory=DIRECTORY):
    """The checkpoint prefix of `kind` under `directory`."""
    return os.path.join(directory, kind, "model.ckpt-%d" % STEP)


def write_original_checkpoint(module, kind, directory, case=None, data=None,
                              name="moe"):
    """Writes a TF1 checkpoint of the original's MoE with tf.compat.v1.

    Builds CASES[kind] (or `case`) with the original, sets its variables to
    hierarchical.make_data's weights (or `data`'s), adds a `global_step`
    (= STEP), and saves everything with
    `tf.compat.v1.train.Saver(save_relative_paths=True)` as
    `<directory>/model.ckpt-<step>` (.index and .data; the `checkpoint`
    state file too; no .meta graph).
    Returns (prefix, {"x", "y", "importance", "load"}): the input batch and
    the original's inference outputs on it (datashards as in the case).
    """
    import tensorflow as tf

    v1 = tf.compat.v1
    case = case if case is not None else CASES[kind]
    data = data if data is not None else make_data(case)
    graph = v1.Graph()
    with graph.as_default():
        moe, wvars = build_original_moe(module, kind, case, name=name)
        step = v1.train.get_or_create_global_step()
        if kind == "local":
            y, importance, load, _, _ = moe.Eval(v1.constant(data["x"]),
                                                 False)
        else:
            slices = shard_slices(case)
            ys, importance, load, _, _ = moe.Eval(
                ["/cpu:0"] * len(slices),
                [v1.constant(data["x"][s]) for s in slices], False)
            y = tf.concat(ys, 0)
        names = [n for n in weight_names(case) if n in wvars]
        assert sorted(names) == sorted(wvars), (names, sorted(wvars))
        assigns, feeds = assign_original_weights(wvars, data, names)
        assigns.append(v1.assign(step, STEP))
        init = v1.global_variables_initializer()
        saver = v1.train.Saver(save_relative_paths=True)
        with v1.Session(graph=graph, config=session_config()) as sess:
            sess.run(init)
            sess.run(assigns, feeds)
            out = sess.run({"y": y, "importance": importance, "load": load})
            os.makedirs(directory, exist_ok=True)
            path = saver.save(sess, os.path.join(directory, "model.ckpt"),
                              global_step=STEP, write_meta_graph=False)
    out = {k: np.asarray(v, np.float32) for k, v in out.items()}
    out["x"] = data["x"]
    return path, out


def outputs_entry(out):
    """`(data, results)` of write_original_checkpoint's outputs, as the
    fixtures store them."""
    return ({"x": out["x"]},
            {"ref": {k: v for k, v in out.items() if k != "x"}})
