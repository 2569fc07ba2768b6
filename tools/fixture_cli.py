"""What the tools/make_*_fixtures.py scripts share: tests/oracle.py, their
command line (--original, --out, --cases), running cases through the
original, and writing the .npz."""

import argparse
import importlib.util
import os
import time

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_oracle():
    """tests/oracle.py, the harness that runs the original."""
    path = os.path.join(REPO_ROOT, "tests", "oracle.py")
    spec = importlib.util.spec_from_file_location("_keras_moe_parity_oracle",
                                                  path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_args(doc, oracle, default_out, argv=None, cases_by_name=None):
    """`(args, original module)` from the command line.

    `--original PATH` (default: tests/oracle.py's find_original()) and
    `--out`; with `cases_by_name`, also `--cases NAME ...`, checked against
    it. Errors name the bad value and exit with usage.
    """
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--original", default=oracle.find_original(),
                        help="path of the original expert_utils_2017.py "
                        "(default: $KERAS_MOE_ORIGINAL or "
                        "../shared/reference/expert_utils_2017.py)")
    parser.add_argument("--out", default=default_out)
    if cases_by_name is not None:
        parser.add_argument("--cases", nargs="*", default=None,
                            help="subset of case names (default: all); the "
                            "other cases already in --out are kept")
    args = parser.parse_args(argv)
    if not args.original or not os.path.isfile(args.original):
        parser.error("--original: no such file: %r" % (args.original,))
    unknown = [n for n in getattr(args, "cases", None) or []
               if n not in cases_by_name]
    if unknown:
        parser.error("--cases: unknown case(s) %r; known: %r" %
                     (unknown, sorted(cases_by_name)))
    return args, oracle.load_original(args.original)


def original_meta(args):
    """What a fixture file records about how it was made."""
    import tensorflow as tf

    return {"tensorflow": tf.__version__,
            "original": os.path.basename(args.original)}


def run_cases(cases, make_data, run, module, bad_values, label):
    """`{name: (data, results)}`: each case through the original, with a
    line per case naming the results that hold `bad_values(results)`."""
    case_results = {}
    for case in cases:
        start = time.time()
        data = make_data(case)
        results = run(module, case, data)
        case_results[case["name"]] = (data, results)
        print("%-34s %.2fs  %s: %s" % (case["name"], time.time() - start,
                                       label, bad_values(results)))
    return case_results


def nan_by_mode(results):
    """The results of each mode that hold a NaN."""
    return {mode: sorted(k for k, v in res.items() if np.isnan(v).any())
            for mode, res in results.items()}


def keep_other_cases(case_results, out, oracle, all_cases, unpack):
    """`case_results` plus the cases already in `out` that were not rerun,
    in the order of `all_cases`."""
    if not os.path.isfile(out):
        return case_results
    old = np.load(out)
    meta = oracle.read_meta(old)
    known = {c["name"] for c in all_cases}
    merged = dict(case_results)
    for name in meta["index"]:
        if name not in merged and name in known:
            _, data, results = unpack(old, name, meta)
            merged[name] = (data, results)
    return {c["name"]: merged[c["name"]] for c in all_cases
            if c["name"] in merged}


def save_npz(out, flat):
    """Writes the arrays `flat` to `out`, compressed, and says so."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    np.savez_compressed(out, **flat)
    print("wrote %s (%d arrays, %d bytes)" %
          (out, len(flat), os.path.getsize(out)))


def make_case_fixtures(doc, argv, oracle, default_out, cases, make_data, run,
                       unpack, pack):
    """The whole of a script that runs parity cases (each in training and
    inference) through the original and writes them to `--out`, keeping the
    cases of a previous file that `--cases` did not name."""
    cases_by_name = {c["name"]: c for c in cases}
    args, module = parse_args(doc, oracle, default_out, argv,
                              cases_by_name=cases_by_name)
    selected = [c for c in cases if not args.cases or c["name"] in args.cases]
    case_results = run_cases(selected, make_data, run, module, nan_by_mode,
                             "NaN")
    if args.cases:
        case_results = keep_other_cases(case_results, args.out, oracle,
                                        cases, unpack)
    save_npz(args.out, pack(case_results, original_meta(args)))
