"""Which machine ran a benchmark, and how: CPU, memory, affinity, load
average, the repository's commit and the environment settings that change
CPU speed a lot."""

import os
import platform

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_average():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def git_revision():
    """The repository's commit (with "+dirty" when keras_moe/ has changes),
    or None."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                              cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "keras_moe"],
                               cwd=REPO_ROOT, capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if dirty else "")) or None


# Settings that change CPU speed a lot (docs/performance.md): oneDNN
# kernels and its allocator, TensorFlow's BFC allocator on the CPU, glibc's
# malloc, a preloaded allocator.
ENVIRONMENT_KEYS = ("TF_ENABLE_ONEDNN_OPTS", "TF_CPU_ALLOCATOR_USE_BFC",
                    "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_",
                    "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD")


def environment_info():
    """The settings of ENVIRONMENT_KEYS in this run (unset ones left out)."""
    return {k: os.environ[k] for k in ENVIRONMENT_KEYS if k in os.environ}


def machine_info():
    info = {"nproc": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    info["mem_total_gib"] = round(
                        int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        info["affinity_cpus"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        pass
    return info
