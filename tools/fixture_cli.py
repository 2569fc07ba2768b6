"""What the tools/make_*_fixtures.py scripts share: their command line
(--original, --out, --cases), running cases through the original, and
writing the .npz in the one fixture format (reference_harness.fixtures).

The harness is imported from the repository root, which is put on sys.path
when the tools run as scripts."""

import argparse
import os
import sys
import time

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from reference_harness import fixtures, original  # noqa: E402


def parse_args(doc, default_out, argv=None, cases_by_name=None):
    """`(args, original module)` from the command line.

    `--original PATH` (default: reference_harness.original.find_original())
    and `--out`; with `cases_by_name`, also `--cases NAME ...`, checked
    against it. Errors name the bad value and exit with usage.
    """
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--original", default=original.find_original(),
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
    return args, original.load_original(args.original)


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


def nan_by_group(results):
    """The results of each group (mode) that hold a NaN."""
    return {group: sorted(k for k, v in res.items() if np.isnan(v).any())
            for group, res in results.items()}


def non_finite_by_group(results):
    """The results of each group that hold a NaN or an infinity."""
    return {group: sorted(k for k, v in res.items()
                          if not np.isfinite(v).all())
            for group, res in results.items()}


def keep_other_cases(case_results, out, all_cases):
    """`case_results` plus the cases already in `out` that were not rerun,
    in the order of `all_cases`."""
    if not os.path.isfile(out):
        return case_results
    old = fixtures.FixtureFile(out)
    known = {c["name"] for c in all_cases}
    merged = dict(case_results)
    for name in old.names():
        if name not in merged and name in known:
            _, data, results = old.get(name)
            merged[name] = (data, results)
    return {c["name"]: merged[c["name"]] for c in all_cases
            if c["name"] in merged}


def save_npz(out, flat):
    """Writes the arrays `flat` to `out`, compressed, and says so."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    np.savez_compressed(out, **flat)
    print("wrote %s (%d arrays, %d bytes)" %
          (out, len(flat), os.path.getsize(out)))


def make_case_fixtures(doc, argv, suite, bad_values=nan_by_group,
                       label="NaN"):
    """The whole of a script that runs the cases of a harness suite
    (reference_harness.flat, .hierarchical, .embedding_softmax) through the
    original and writes them to `--out` (default: the suite's FIXTURES),
    keeping the cases of a previous file that `--cases` did not name."""
    args, module = parse_args(doc, suite.FIXTURES, argv,
                              cases_by_name=suite.CASES_BY_NAME)
    selected = [c for c in suite.CASES
                if not args.cases or c["name"] in args.cases]
    case_results = run_cases(selected, suite.make_data, suite.run_original,
                             module, bad_values, label)
    if args.cases:
        case_results = keep_other_cases(case_results, args.out, suite.CASES)
    save_npz(args.out, fixtures.pack(suite.CASES_BY_NAME, case_results,
                                     original_meta(args)))
