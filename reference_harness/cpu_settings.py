"""Which CPU and which oneDNN setting the tests and benchmarks run under.

TensorFlow turns oneDNN on by default on some x86 CPUs (those with AVX-512
VNNI, BF16 or AMX) and off on others; `TF_ENABLE_ONEDNN_OPTS` overrides it.
Rounding differs between the two, so CI runs the numeric tests under both
(.ci/run), pytest's header says which ran (tests/conftest.py), and
benchmarks/bench_tracing.py records it.

TensorFlow has no public way to ask whether oneDNN is on: `onednn_enabled`
reads it from a private module, the only private TensorFlow API of the test
harness; tests/test_cpu_settings.py fails loudly if an upgrade moves it.

As a script, `python -m reference_harness.cpu_settings --other-onednn`
prints the value of TF_ENABLE_ONEDNN_OPTS ("0" or "1") opposite to
TensorFlow's default on this machine (run it with TF_ENABLE_ONEDNN_OPTS
unset); without arguments, `describe()`.
"""

import os
import platform
import sys

USAGE = "usage: python -m reference_harness.cpu_settings [--other-onednn]"


def onednn_enabled():
    """Whether TensorFlow runs its oneDNN kernels in this process."""
    from tensorflow.python.util import _pywrap_util_port

    return bool(_pywrap_util_port.IsMklEnabled())


def cpu_name():
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe():
    """One line: the CPU, and oneDNN on or off and why."""
    setting = os.environ.get("TF_ENABLE_ONEDNN_OPTS")
    why = ("TF_ENABLE_ONEDNN_OPTS=" + setting if setting is not None
           else "TensorFlow's default here")
    return "CPU: %s; oneDNN: %s (%s)" % (
        cpu_name(), "on" if onednn_enabled() else "off", why)


def main(argv):
    if argv == ["--other-onednn"]:
        print("0" if onednn_enabled() else "1")
    elif argv == []:
        print(describe())
    else:
        return USAGE
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.exit(main(sys.argv[1:]))
