"""Plot `kvrack bench peers --json` (and `kvrack bench e2e --peers --json`) results.

python docs/plot_peers.py docs/bench-peers.json docs/peers [docs/bench-e2e-peers.json]
(``-`` for the first file plots the engine-level results alone)

Writes peers-throughput.png and peers-p99.png (per block size, one panel per batch size, read and write),
peers-lmcache.png (LMCache's server vs kvrack's paged-KV API) and, with the e2e file, peers-ttft.png.
Needs the docs extra (pip install 'kvrack[docs]').
"""

import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

COLORS = {"kvrack-shm": "#1f77b4", "kvrack-tcp": "#6baed6", "kvrack-nixl": "#08306b", "redis-unix": "#d62728",
          "redis-tcp": "#ff9896", "mooncake-tcp": "#2ca02c"}
SIZES = ("64KiB", "256KiB", "2MiB")


def _systems(data):
    return [(name, s) for name, s in data["systems"].items() if "cells" in s]


def _per_cell(data, dst, figure, ylabel, log, title):
    batches = sorted({int(c.split("/")[1]) for _, s in _systems(data) for c in s["cells"]})
    fig, axes = plt.subplots(2, len(batches), figsize=(4.2 * len(batches), 7), squeeze=False)
    for row, phase in enumerate(("read", "write")):
        for col, batch in enumerate(batches):
            ax = axes[row][col]
            for name, system in _systems(data):
                xs = [s for s in SIZES if f"{s}/{batch}" in system["cells"]]
                ys = [figure(system["cells"][f"{s}/{batch}"][phase]) for s in xs]
                ax.plot(xs, ys, marker="o", label=name, color=COLORS.get(name))
            if log:
                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
                ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
                ax.tick_params(axis="y", which="minor", labelsize=6)
            ax.set_title(f"{phase}, batches of {batch}", fontsize=9)
            ax.set_xlabel("block size")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{title}; {data['versions'].get('cpus')} CPU cores, one client", fontsize=10)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)
    plt.close(fig)


def _lmcache(data, dst):
    lmc = data.get("lmcache") or {}
    if "lmcache" not in lmc:
        return
    cells = list(lmc["lmcache"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "get_p50_ms", "retrieve / get_kv"), (axes[1], "store_p50_ms", "store / put_kv")):
        width = 0.38
        xs = range(len(cells))
        ax.bar([x - width / 2 for x in xs], [lmc["lmcache"][c][key] for c in cells], width, label="LMCache server",
               color="#ff7f0e")
        ax.bar([x + width / 2 for x in xs], [lmc["kvrack"][c][key] for c in cells], width, label="kvrack (shm)",
               color="#1f77b4")
        ax.set_xticks(list(xs), [c.replace("/", " blocks\n") + " tokens" for c in cells], fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("p50 per request (ms, log)")
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"LMCache {lmc['versions'].get('lmcache')} multi-process server vs kvrack, same KV tensors "
                 "(Llama-8B-like layers, fp16)", fontsize=9)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)
    plt.close(fig)


def _ttft(data, dst):
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, runs in data["systems"].items():
        if "lengths" not in runs:
            continue
        lengths = sorted(runs["lengths"], key=int)
        for case, style in (("cpu_hit", "-"), ("disk_hit", "--")):
            ys = [runs["lengths"][n].get(f"{case}_ttft_s") for n in lengths]
            if any(y is not None for y in ys):
                ax.plot([int(n) for n in lengths], ys, style, marker="o", label=f"{name}: {case.replace('_', ' ')}")
    recompute = data.get("recompute")
    if recompute:
        lengths = sorted(recompute, key=int)
        ax.plot([int(n) for n in lengths], [recompute[n] for n in lengths], ":", color="#999999", label="recompute")
    ax.set_xscale("log", base=2)
    ticks = sorted({int(n) for runs in data["systems"].values() for n in runs.get("lengths", {})})
    ax.set_xticks(ticks, [str(n) for n in ticks])
    ax.set_yscale("log")
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("time to first token (s, log)")
    ax.set_title(f"prefix hit TTFT through vLLM {data.get('vllm_version')}, each system's CPU and disk tier",
                 fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)
    plt.close(fig)


def main(src, out_dir, e2e=None):
    os.makedirs(out_dir, exist_ok=True)
    if e2e:
        _ttft(json.loads(open(e2e).read()), os.path.join(out_dir, "peers-ttft.png"))
    if src == "-":  # the engine-level plot alone
        return
    data = json.loads(open(src).read())
    _per_cell(data, os.path.join(out_dir, "peers-throughput.png"), lambda p: p["gbs"], "GB/s (log)", True,
              "throughput by block size")
    _per_cell(data, os.path.join(out_dir, "peers-p99.png"), lambda p: p["p99_us"] / 1000, "p99 per request (ms, log)",
              True, "p99 latency per request by block size")
    _lmcache(data, os.path.join(out_dir, "peers-lmcache.png"))


if __name__ == "__main__":
    main(*sys.argv[1:4])
