"""The benchmark's progress lines: one line on stderr per step, stamped
with the seconds since the run started (since this module was imported)."""

import os
import sys
import time

START = time.time()
# The running script's name: bench_moe, bench_peers, ...
SCRIPT = os.path.splitext(os.path.basename(sys.argv[0] or "bench"))[0]


def log(msg):
    print("[%s %6.1fs] %s" % (SCRIPT, time.time() - START, msg),
          file=sys.stderr, flush=True)
