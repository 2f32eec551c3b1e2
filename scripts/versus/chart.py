#!/usr/bin/env python3
"""Draws keel-versus's chart: output records per second over time, one panel per part (faults:
worker and master kills; changes: upgrade and rescale), one line per system, the events marked.

Usage: chart.py TIMELINE_CSV EVENTS_CSV OUT_PNG (the CSVs keel-versus writes under --out).
"""
import csv
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PARTS = [("faults", "Worker kill -9 x3, then master kill -9 (at-least-once, steady load)"),
         ("changes", "Upgrade, then rescale 1 -> 2 (exactly-once, steady load)")]


def read(timeline_csv, events_csv):
    series = defaultdict(list)  # (system, part) -> [(second, records)]
    with open(timeline_csv, newline="") as f:
        for row in csv.DictReader(f):
            series[(row["system"], row["part"])].append((int(row["second"]), int(row["records"])))
    events = defaultdict(list)  # (system, part) -> [(second, label)]
    with open(events_csv, newline="") as f:
        for row in csv.DictReader(f):
            events[(row["system"], row["part"])].append((float(row["second"]), row["event"]))
    return series, events


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    series, events = read(sys.argv[1], sys.argv[2])
    systems = sorted({s for s, _ in series}, key=lambda s: (s != "Keel", s))
    colors = dict(zip(systems, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    fig, axes = plt.subplots(len(PARTS), 1, figsize=(12, 4.2 * len(PARTS)))
    for ax, (part, title) in zip(axes, PARTS):
        for system in systems:
            points = series.get((system, part))
            if not points:
                continue
            xs, ys = zip(*points)
            ax.plot(xs, ys, label=system, color=colors[system], linewidth=1.2)
            for second, label in events.get((system, part), []):
                ax.axvline(second, color=colors[system], linestyle=":", linewidth=0.9)
                ax.annotate(label, (second, 0), xytext=(2, 4), textcoords="offset points",
                            rotation=90, fontsize=7, color=colors[system], va="bottom")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("seconds since the load started")
        ax.set_ylabel("output records / s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(sys.argv[3], dpi=110)


if __name__ == "__main__":
    main()
