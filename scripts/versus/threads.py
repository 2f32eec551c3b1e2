#!/usr/bin/env python3
"""CPU seconds per thread of a process over a window, grouped by thread name (digits folded),
from /proc/PID/task/*/stat: where a process's CPU goes, for a JVM as for Keel, without a
profiler. Usage: threads.py PID SECONDS"""
import os
import re
import sys
import time
from collections import defaultdict

TICKS = os.sysconf("SC_CLK_TCK")


def sample(pid):
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                text = f.read()
        except OSError:
            continue
        name = text[text.index("(") + 1:text.rindex(")")]
        fields = text[text.rindex(")") + 2:].split()
        out[tid] = (name, (int(fields[11]) + int(fields[12])) / TICKS)
    return out


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    pid, seconds = sys.argv[1], float(sys.argv[2])
    before = sample(pid)
    time.sleep(seconds)
    after = sample(pid)
    groups = defaultdict(float)
    for tid, (name, cpu) in after.items():
        groups[re.sub(r"\d+", "N", name)] += cpu - before.get(tid, (name, 0.0))[1]
    total = sum(groups.values())
    print(f"pid {pid}: {total:.2f} CPU s in {seconds:.0f} s")
    for name, cpu in sorted(groups.items(), key=lambda kv: -kv[1]):
        if cpu > 0.005 * max(total, 0.01):
            print(f"  {cpu:7.2f} s  {100 * cpu / max(total, 1e-9):5.1f} %  {name}")


if __name__ == "__main__":
    main()
