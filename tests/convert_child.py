"""A child process for tests/test_convert.py: convert (or only open) a checkpoint, then print its peak RSS.

    python tests/convert_child.py CHECKPOINT OUT FORMAT [--kill-at-bytes N] [--baseline]

--baseline imports the same modules and opens the checkpoint, converting nothing: the RSS every run pays.
--kill-at-bytes SIGKILLs this process from the progress callback once N checkpoint bytes are converted, so
the kill lands mid-layer deterministically. The last line printed is `peak_rss_kib N` (VmHWM at exit).
"""

import os
import signal
import sys


def peak_rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def main(argv):
    checkpoint, out, fmt = argv[:3]
    kill_at = int(argv[argv.index("--kill-at-bytes") + 1]) if "--kill-at-bytes" in argv else None

    from hybrid.read.checkpoint import Checkpoint
    from hybrid.read.convert import convert

    def progress(done_bytes, total_bytes):
        if kill_at is not None and done_bytes >= kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    if "--baseline" in argv:
        Checkpoint.open(checkpoint)
    else:
        convert(checkpoint, out, fmt, progress=progress)
    print(f"peak_rss_kib {peak_rss_kib()}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
