#!/usr/bin/env python3
"""Charts of the traffic-spike matrix (BENCHMARKS.md, "Traffic spikes").

Reads the saga-bench JSON reports of a folder:
  peak_<mode>.json            the closed-loop peak (admission off)
  <mode>_<rate>.json          open loop at <rate> sagas/s (admission on)
  <mode>_<rate>_off.json      the same rate with admission off (optional)
  spike_<mode>.json           a spike inside an open loop (per-second series)
and writes throughput-vs-offered-<mode>.png and spike-<mode>.png there.

Usage: python3 scripts/plot_spikes.py docs/bench/spikes   (pip install matplotlib)
"""

import json
import pathlib
import re
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load(path):
    with open(path) as f:
        return json.load(f)


def finish(fig, left, right, title, legend_at, path):
    """One legend for both axes, the title, and the file."""
    handles = left.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    left.legend(handles[0] + more[0], handles[1] + more[1], fontsize=7, loc=legend_at)
    left.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def offered_chart(folder, mode):
    peak_file = folder / f"peak_{mode}.json"
    if not peak_file.exists():
        return
    peak = load(peak_file)["sagas_per_s"]
    runs = []
    for path in folder.glob(f"{mode}_*.json"):
        m = re.fullmatch(rf"{mode}_(\d+)(_off)?", path.stem)
        if not m:
            continue
        r = load(path)
        runs.append((int(m.group(1)) / peak, r, m.group(2) is not None))
    if not runs:
        return
    fig, left = plt.subplots(figsize=(8, 4.5))
    right = left.twinx()
    for off, style in ((False, "-"), (True, ":")):
        points = sorted((x, r) for x, r, o in runs if o == off)
        if not points:
            continue
        xs = [x for x, _ in points]
        label = " (admission off)" if off else ""
        left.plot(xs, [r["sagas_per_s"] for _, r in points], "o" + style, color="tab:green",
                  label="completed/s" + label)
        if not off:
            left.plot(xs, [r["refused_per_s"] for _, r in points], "s" + style, color="tab:red",
                      label="refused/s")
        right.plot(xs, [r["latency"]["p99_ms"] for _, r in points], "^" + style, color="tab:blue",
                   label="p99 ms" + label)
    left.axhline(peak, color="tab:green", alpha=0.3, linestyle="--", label=f"peak {peak:.0f}/s")
    left.axhline(0.9 * peak, color="tab:green", alpha=0.3, linestyle=":", label="90 % of the peak")
    right.axhline(1000, color="tab:blue", alpha=0.3, linestyle="--", label="1 s")
    left.set_xlabel("offered load / closed-loop peak")
    left.set_ylabel("sagas per second")
    right.set_ylabel("p99 start-to-end of admitted sagas, ms")
    right.set_yscale("log")
    finish(fig, left, right, f"Open loop against offered load, {mode} participants, 60 s windows",
           "upper left", folder / f"throughput-vs-offered-{mode}.png")


def spike_chart(folder, mode):
    path = folder / f"spike_{mode}.json"
    if not path.exists():
        return
    series = load(path)["series"]
    seconds = [s["second"] for s in series]
    fig, left = plt.subplots(figsize=(8, 4.5))
    right = left.twinx()
    left.plot(seconds, [s["admitted"] + s["refused"] for s in series], color="grey", label="offered/s")
    left.plot(seconds, [s["admitted"] for s in series], color="tab:orange", label="admitted/s")
    left.plot(seconds, [s["refused"] for s in series], color="tab:red", label="refused/s")
    left.plot(seconds, [s["completed"] for s in series], color="tab:green", label="completed/s")
    right.plot(seconds, [s["p99_ms"] for s in series], color="tab:blue", linestyle="--",
               label="p99 ms (sagas started that second)")
    left.set_xlabel("seconds since the load started")
    left.set_ylabel("per second")
    right.set_ylabel("ms")
    finish(fig, left, right, f"A spike inside an open loop, {mode} participants", "upper right",
           folder / f"spike-{mode}.png")


def main():
    folder = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "docs/bench/spikes")
    for mode in ("echo", "demo"):
        offered_chart(folder, mode)
        spike_chart(folder, mode)


if __name__ == "__main__":
    main()
