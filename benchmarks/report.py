"""The report of a bench_moe.py run: the issue-5 targets, each with its
value and whether it is met (information, not assertions), the number
formats, and the markdown tables printed at the end (machine and CPU,
measured rates, one table per configuration, scaling, peak memory,
targets)."""

from configs import (CONFIGS, MEMORY_METHODS, METHODS, MODE_LABELS, OURS,
                     SCALING, SCALING_METHODS, THREADS)
from machine import ENVIRONMENT_KEYS


def _get(d, *keys):
    for k in keys:
        if d is None:
            return None
        d = d.get(k)
    return d


def targets(results):
    cfgs = results["configs"]
    rows = []

    def add(name, value, limit, note=""):
        rows.append({"target": name, "value": value, "limit": limit,
                     "met": None if value is None else bool(value <= limit),
                     "note": note})

    for cfg, limit in (("large", 1.0), ("small-batch", 0.7),
                       ("many-experts", 0.7)):
        add("sparse/original, train fwd+bwd, %s" % cfg,
            _get(cfgs, cfg, "vs_original", "sparse", "train_fwd_bwd"), limit)
    add("sparse/original, infer fwd, serving",
        _get(cfgs, "serving", "vs_original", "sparse", "infer_fwd"), 0.6)
    for cfg in CONFIGS:
        mode = "infer_fwd" if cfg == "serving" else "train_fwd_bwd"
        vals = {m: _get(cfgs, cfg, "R_roofline", m, mode) for m in OURS}
        vals = {m: v for m, v in vals.items() if v is not None}
        best = min(vals, key=vals.get) if vals else None
        add("best dispatch R_roofline, %s, %s" % (MODE_LABELS[mode], cfg),
            vals.get(best), 1.5, "best: %s" % best if best else "")
    mem = results.get("memory") or {}
    for m in ("sparse", "capacity"):
        add("peak memory %s/oracle, train fwd+bwd, large" % m,
            _get(mem, "ratio_vs_oracle", m), 1.5)
    scal = results.get("scaling") or {}
    hi, lo = scal.get("cost_ratio_experts") or SCALING["ratio"]
    thi = {m: _get(scal, "times", m, str(hi), "median_s") for m in OURS}
    thi = {m: v for m, v in thi.items() if v is not None}
    best = min(thi, key=thi.get) if thi else None
    add("scaling cost(%d)/cost(%d), best dispatch at %d" % (hi, lo, hi),
        _get(scal, "cost_ratio", best) if best else None, 2.0,
        "best: %s" % best if best else "")
    vals = {m: _get(cfgs, "many-experts", "R_oracle", m, "train_fwd_bwd")
            for m in ("capacity", "capacity_xla")}
    vals = {m: v for m, v in vals.items() if v is not None}
    best = min(vals, key=vals.get) if vals else None
    add("capacity R_oracle, train fwd+bwd, many-experts", vals.get(best), 2.0,
        "best: %s" % best if best else "")
    return rows


def fmt_s(t):
    if t is None:
        return "—"
    if t >= 1.0:
        return "%.2f s" % t
    if t >= 1e-3:
        return "%.1f ms" % (t * 1e3)
    return "%.0f µs" % (t * 1e6)


def fmt_r(r, digits=2):
    return "—" if r is None else ("%.*f" % (digits, r))


def _loads(v):
    return "—" if v is None else "/".join("%.2f" % x for x in v)


def markdown(results):
    meta, rates = results["meta"], results["rates"]
    lines = []
    a = lines.append
    a("# keras_moe benchmark%s" % (" (--quick: scaled-down shapes)"
                                    if meta["quick"] else ""))
    a("")
    m = meta["machine"]
    a("Machine: %s CPUs (%s), %s GiB; TensorFlow %s, Keras %s, keras_moe %s "
      "(%s); %d intra-op / %d inter-op threads; started %s." % (
          m.get("nproc"), m.get("cpu_model", "?"), m.get("mem_total_gib"),
          meta["tensorflow"], meta["keras"], meta["keras_moe"],
          meta.get("git") or "no git", THREADS, THREADS,
          meta.get("started")))
    a("Load average (1, 5, 15 min) before %s, after %s; wall %.0f s." % (
        _loads(meta.get("load_before")), _loads(meta.get("load_after")),
        meta["wall_s"]))
    if meta.get("xla_flags"):
        a("XLA_FLAGS=`%s`." % meta["xla_flags"])
    env = meta.get("environment") or {}
    a("Environment: %s." % (
        ", ".join("`%s=%s`" % kv for kv in sorted(env.items()))
        or "none of %s set (TensorFlow's defaults)" % ", ".join(
            "`%s`" % k for k in ENVIRONMENT_KEYS)))
    if meta.get("original") is None:
        a("")
        a("**The original was not found: its columns are skipped.**")
    else:
        a("Original: `%s`." % meta["original"])
    a("")
    a("## Measured rates")
    a("")
    a("GEMM: %d² float32 matmul; read: reduce_sum over %d MiB. Each "
      "configuration's rates are measured round-robin with its methods "
      "and give its roofline." % (rates["gemm_n"], rates["read_mib"]))
    a("")
    a("| when | GEMM GFLOP/s (median / best) | read GB/s (median / best) |")
    a("|---|---|---|")
    rows = [("start", rates.get("start"))]
    rows += [(name, cfg.get("rates"))
             for name, cfg in results["configs"].items()]
    rows.append(("end", rates.get("end")))
    for when, r in rows:
        if r:
            a("| %s | %s / %s | %s / %s |" % (
                when, fmt_r(r["gemm_gflops"], 1),
                fmt_r(r["gemm_gflops_best"], 1), fmt_r(r["read_gbps"], 1),
                fmt_r(r["read_gbps_best"], 1)))
    a("")
    a("Medians over repetitions; R_oracle = time / oracle time; R_roofline "
      "= time / roofline; ÷orig = time / the original's time.")
    for name, cfg in results["configs"].items():
        s = cfg["shape"]
        a("")
        a("## %s: tokens %d, d %d, hidden %d, experts %d, k %d" % (
            name, s["tokens"], s["d"], s["hidden"], s["experts"], s["k"]))
        a("")
        f = cfg["routing"]
        a("Active experts: train %d, infer %d of %d; capacity train %d / "
          "infer %d slots per expert, choices dropped train %.2f%% / "
          "infer %.2f%%." % (
              f["active_experts_train"], f["active_experts_infer"],
              s["experts"], f["capacity_train"], f["capacity_infer"],
              100 * f["capacity_dropped_fraction_train"],
              100 * f["capacity_dropped_fraction_infer"]))
        a("Roofline: " + "; ".join(
            "%s %s (%.2f GFLOP, %.1f MB weights, %s-bound)" % (
                MODE_LABELS[mode], fmt_s(cfg["roofline_s"][mode]),
                cfg["useful_gflop"][mode], cfg["weight_mb"][mode],
                cfg["roofline_bound"][mode]) for mode in cfg["modes"]) + ".")
        c = cfg["check"]
        a("Check (inference): max |y_dense_all - y_sparse| = %s, max "
          "|y_capacity - y_sparse| = %s (max |y| %s); sum |y| sparse %s, "
          "original %s." % (
              fmt_r(c["max_abs_diff_dense_all_vs_sparse"], 6),
              fmt_r(c["max_abs_diff_capacity_vs_sparse"], 6),
              fmt_r(c["max_abs_y_sparse"], 3),
              fmt_r(c["sum_abs_y_sparse"], 2),
              fmt_r(c["sum_abs_y_original"], 2)))
        a("")
        head = "| method |"
        rule = "|---|"
        for mode in cfg["modes"]:
            lab = MODE_LABELS[mode]
            head += " %s | R_oracle | R_roofline | ÷orig |" % lab
            rule += "---|---|---|---|"
        a(head)
        a(rule)
        for method in METHODS:
            row = "| %s |" % method
            for mode in cfg["modes"]:
                t = cfg["times"][method][mode]
                row += " %s | %s | %s | %s |" % (
                    fmt_s(t["median_s"]) if t["median_s"] is not None else (
                        "skipped" if t.get("error") else "—"),
                    fmt_r(cfg["R_oracle"][method][mode]),
                    fmt_r(cfg["R_roofline"][method][mode]),
                    fmt_r(cfg["vs_original"][method][mode]))
            a(row)
        errors = sorted({"%s: %s" % (m, t["error"])
                         for m in METHODS for t in cfg["times"][m].values()
                         if t.get("error")})
        for e in errors:
            a("")
            a("- %s" % e)
    scal = results.get("scaling")
    if scal:
        s = scal["shape"]
        a("")
        a("## Scaling: train fwd+bwd, tokens %d, d %d, hidden %d, k %d" % (
            s["tokens"], s["d"], s["hidden"], s["k"]))
        a("")
        a("| method | " + " | ".join("%s experts" % e
                                     for e in scal["experts"])
          + " | cost(%d)/cost(%d) |" % tuple(scal["cost_ratio_experts"]))
        a("|---|" + "---|" * (len(scal["experts"]) + 1))
        for m in SCALING_METHODS + ("oracle",):
            a("| %s | %s | %s |" % (m, " | ".join(
                fmt_s(scal["times"][m][str(e)]["median_s"])
                for e in scal["experts"]),
                fmt_r(scal["cost_ratio"].get(m))))
    mem = results.get("memory")
    if mem:
        s = mem["shape"]
        a("")
        a("## Peak memory of a train fwd+bwd step: %s (tokens %d, d %d, "
          "hidden %d, experts %d, k %d)" % (
              mem["config"], s["tokens"], s["d"], s["hidden"], s["experts"],
              s["k"]))
        a("")
        a("| method | peak delta (MB) | first step delta (MB) | ÷oracle |")
        a("|---|---|---|---|")
        for m in MEMORY_METHODS:
            r = mem["methods"][m]
            a("| %s | %s | %s | %s |" % (
                m, fmt_r(r.get("peak_delta_mb"), 1),
                fmt_r(r.get("first_step_delta_mb"), 1),
                fmt_r(mem["ratio_vs_oracle"][m])))
        how = {r.get("how") for r in mem["methods"].values() if r.get("how")}
        if how:
            a("")
            a("Measured as: %s." % "; ".join(sorted(how)))
    a("")
    a("## Targets (issue 5; information, not assertions)")
    a("")
    a("| target | value | limit | met |")
    a("|---|---|---|---|")
    for t in results["targets"]:
        a("| %s%s | %s | ≤ %s | %s |" % (
            t["target"], " (%s)" % t["note"] if t["note"] else "",
            fmt_r(t["value"]), t["limit"],
            "—" if t["met"] is None else ("yes" if t["met"] else "no")))
    if meta["quick"]:
        a("")
        a("(--quick shapes are scaled down: the targets refer to the full "
          "shapes.)")
    return "\n".join(lines) + "\n"
