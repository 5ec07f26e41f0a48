#!/usr/bin/env python3
"""Draws the scaling charts of BENCHMARKS.md from saga-bench JSON reports.

Usage: python3 scripts/plot_benchmarks.py docs/bench
Reads echo-c*.json (concurrency), echo-steps*.json (steps per saga),
echo-open-*.json (open-loop arrival rate) and echo-peak.json /
echo-prefill1m.json (history size); writes PNGs next to them.
Needs matplotlib (pip install matplotlib).
"""
import glob
import json
import os
import re
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load(pattern, key):
    points = []
    for path in glob.glob(pattern):
        match = re.search(key, os.path.basename(path))
        if match:
            with open(path) as f:
                points.append((int(match.group(1)), json.load(f)))
    return sorted(points, key=lambda p: p[0])


def chart(path, title, xlabel, xs, series, log_x=False):
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for label, ys, style in series:
        ax.plot(xs, ys, style, label=label)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.grid(True, alpha=0.3)
    if log_x:
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs)
        ax.set_xticklabels([str(x) for x in xs])
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    print("wrote", path)


def main(folder):
    conc = load(os.path.join(folder, "echo-c*.json"), r"echo-c(\d+)\.json")
    if conc:
        xs = [c for c, _ in conc]
        fig_series = [
            ("completed sagas/s", [r["sagas_per_s"] for _, r in conc], "o-"),
        ]
        chart(os.path.join(folder, "throughput-vs-concurrency.png"),
              "order_placement v1, echo participants", "concurrent sagas (closed loop)", xs, fig_series, log_x=True)
        chart(os.path.join(folder, "latency-vs-concurrency.png"),
              "start-to-completed latency, echo participants", "concurrent sagas (closed loop)", xs,
              [("p50 ms", [r["latency"]["p50_ms"] for _, r in conc], "o-"),
               ("p99 ms", [r["latency"]["p99_ms"] for _, r in conc], "s--")], log_x=True)
    steps = load(os.path.join(folder, "echo-steps*.json"), r"echo-steps(\d+)\.json")
    if steps:
        xs = [n for n, _ in steps]
        chart(os.path.join(folder, "throughput-vs-steps.png"),
              "bench_chain_N, echo participants, 128 concurrent", "steps per saga", xs,
              [("sagas/s", [r["sagas_per_s"] for _, r in steps], "o-"),
               ("steps/s", [r["sagas_per_s"] * n for n, r in steps], "s--")])
    open_loop = []
    for name in ("echo-open-p25.json", "echo-open-p35.json", "echo-open-half.json"):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            with open(path) as f:
                open_loop.append(json.load(f))
    if open_loop:
        open_loop.sort(key=lambda r: r["sagas_per_s"])
        xs = [round(r["sagas_per_s"]) for r in open_loop]
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        ax.plot(xs, [r["latency"]["p50_ms"] for r in open_loop], "o-", label="p50 ms")
        ax.plot(xs, [r["latency"]["p99_ms"] for r in open_loop], "s--", label="p99 ms")
        ax.axhline(100, color="grey", linewidth=0.8, linestyle=":", label="p99 target (100 ms)")
        ax.set_title("start-to-completed latency, echo participants, open loop")
        ax.set_xlabel("arrival rate, sagas/s (the last point is half the peak)")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        out = os.path.join(folder, "latency-vs-rate.png")
        fig.savefig(out)
        plt.close(fig)
        print("wrote", out)
    history = []
    for name, size in (("echo-peak.json", 0), ("echo-prefill1m.json", 1_000_000)):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            with open(path) as f:
                history.append((size, json.load(f)))
    if len(history) == 2:
        fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
        labels = ["empty tables", "1,000,000 finished sagas"]
        ax.bar(labels, [r["sagas_per_s"] for _, r in history], color=["#4c72b0", "#dd8452"])
        ax.set_ylabel("completed sagas/s")
        ax.set_title("Peak throughput against history size")
        fig.tight_layout()
        out = os.path.join(folder, "throughput-vs-history.png")
        fig.savefig(out)
        plt.close(fig)
        print("wrote", out)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/bench")
