"""The benchmark's progress lines: one line on stderr per step, stamped
with the seconds since the run started (since this module was imported)."""

import sys
import time

START = time.time()


def log(msg):
    print("[bench_moe %6.1fs] %s" % (time.time() - START, msg),
          file=sys.stderr, flush=True)
