"""The report of a bench_peers.py run: the issue-16 targets, each with its
value and whether it is met (information, not assertions), and the
markdown tables (machine, keras_moe against Model Garden, keras-hub's dense
block against its sparsified form, targets)."""

from machine import ENVIRONMENT_KEYS
from report import fmt_r, fmt_s

# The limits on sparsified / dense, per family.
SPARSIFIED_LIMITS = {"mixtral-like": 0.5, "qwen3-like": 0.2}


def _target(name, value, limit, strict, note):
    met = None
    if value is not None:
        met = bool(value < limit) if strict else bool(value <= limit)
    return {"target": name, "value": value, "limit": limit,
            "op": "<" if strict else "≤", "met": met, "note": note}


def targets(results):
    rows = []
    for case in results.get("model_garden", ()):
        ours = {m: v for m, v in case["vs_model_garden"].items()
                if m.startswith("ours") and v is not None}
        best = min(ours, key=ours.get) if ours else None
        rows.append(_target(
            "ours / Model Garden per useful FLOP, %s, %s" % (
                case["family"], case["mode"]),
            ours.get(best), 1.0, True,
            "best: %s" % best if best else "Model Garden not run"))
    for case in results.get("keras_hub", ()):
        rows.append(_target(
            "keras-hub sparsified / dense block, %s, %s" % (
                case["family"], case["mode"]),
            case["sparsified_vs_dense"], SPARSIFIED_LIMITS[case["family"]],
            False, "ideal k/E = %.3g" % case["ideal_ratio"]))
    return rows


def _time_cell(case, method):
    t = case["times"][method]
    if t["median_s"] is None:
        return t.get("error", "—").split(":")[0]
    return "%s (%.1f)" % (fmt_s(t["median_s"]),
                          case["useful_gflops_per_s"][method])


def _shape_cells(case):
    s = case["shape"]
    return "%s (d %d, h %d, E %d, k %d) | %s | %d | %.3g" % (
        case["family"], s["d"], s["hidden"], s["experts"], s["k"],
        case["mode"], s["tokens"], case["useful_gflop"])


def _loads(values):
    return "/".join("%.2f" % v for v in values) if values else "—"


def markdown(results):
    meta = results["meta"]
    m = meta["machine"]
    lines = []
    a = lines.append
    a("# Peers%s" % (" (--quick: tiny shapes)" if meta["quick"] else ""))
    a("")
    threads = meta["threads"]
    a("Machine: %s CPUs (%s), %s GiB; TensorFlow %s, Keras %s, keras_moe %s "
      "(%s); %s; started %s." % (
          m.get("nproc"), m.get("cpu_model", "?"), m.get("mem_total_gib"),
          meta["tensorflow"], meta["keras"], meta["keras_moe"],
          meta.get("git") or "no git",
          "%d intra-op / %d inter-op threads" % (threads, threads)
          if threads else "TensorFlow's default threads", meta["started"]))
    a("Load average (1, 5, 15 min) before %s, after %s; wall %.0f s." % (
        _loads(meta["load_before"]), _loads(meta["load_after"]),
        meta["wall_s"]))
    env = meta["environment"]
    a("Environment: %s." % (
        ", ".join("`%s=%s`" % kv for kv in sorted(env.items()))
        or "none of %s set (TensorFlow's defaults)" % ", ".join(
            "`%s`" % k for k in ENVIRONMENT_KEYS)))
    garden = meta["model_garden"]
    if "model_garden" in results:
        if garden.get("versions"):
            a("Model Garden: tf-models-official %(tf_models_official)s on "
              "tf_keras %(tf_keras)s (TensorFlow %(tensorflow)s)" % garden[
                  "versions"] + ", `%s`." % garden["python"])
        else:
            a("")
            a("**Model Garden skipped: %s.**" % garden["error"])
        a("")
        a("## keras_moe against Model Garden's MoeLayer (equal useful "
          "FLOPs)")
        a("")
        a("Time per call (median), in brackets useful GFLOP/s; ÷MG = time "
          "/ Model Garden's time (below 1: ahead).")
        a("")
        ours = ("ours_sparse", "ours_capacity", "ours_expert_choice")
        a("| shape | mode | tokens | useful GFLOP | "
          + " | ".join("%s | ÷MG" % m for m in ours) + " | model_garden |")
        a("|---|---|---|---|" + "---|---|" * len(ours) + "---|")
        for case in results["model_garden"]:
            a("| %s | %s | %s |" % (_shape_cells(case), " | ".join(
                "%s | %s" % (_time_cell(case, m),
                             fmt_r(case["vs_model_garden"][m]))
                for m in ours), _time_cell(case, "model_garden")))
    if "keras_hub" in results:
        hub = meta["keras_hub"]
        a("")
        a("## keras-hub's dense MoE block against its sparsified form")
        a("")
        if hub.get("error"):
            a("**keras-hub skipped: %s.**" % hub["error"])
            a("")
        else:
            a("keras-hub %s; the block of a one-layer %s, before and after "
              "`keras_moe.integrations.keras_hub.sparsify`." % (
                  hub["version"], " / ".join(hub["backbones"]) or "backbone"))
            a("")
        for name, error in sorted(hub.get("failed", {}).items()):
            a("**%s failed: %s.**" % (name, error))
            a("")
        a("Time per call (median), in brackets useful GFLOP/s (the dense "
          "block computes E/k times as much); max |Δy| = max |y_sparsified "
          "- y_dense| / max |y_dense| (inference).")
        a("")
        a("| shape | mode | tokens | useful GFLOP | dense block | sparsified "
          "| sparsified ÷ dense | ideal k/E | max \\|Δy\\| |")
        a("|---|---|---|---|---|---|---|---|---|")
        for case in results["keras_hub"]:
            a("| %s | %s | %s | %s | %.3g | %s |" % (
                _shape_cells(case), _time_cell(case, "dense_block"),
                _time_cell(case, "sparsified"),
                fmt_r(case["sparsified_vs_dense"]), case["ideal_ratio"],
                "—" if case.get("max_rel_diff") is None
                else "%.1e" % case["max_rel_diff"]))
    a("")
    a("## Targets (issue 16; information, not assertions)")
    a("")
    a("| target | value | limit | met |")
    a("|---|---|---|---|")
    for t in results["targets"]:
        a("| %s (%s) | %s | %s %s | %s |" % (
            t["target"], t["note"], fmt_r(t["value"]), t["op"], t["limit"],
            "—" if t["met"] is None else ("yes" if t["met"] else "no")))
    if meta["quick"]:
        a("")
        a("(--quick shapes are tiny: the targets refer to the full shapes.)")
    return "\n".join(lines) + "\n"
