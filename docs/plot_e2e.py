"""Plot `kvrack bench e2e --json` results: python docs/plot_e2e.py docs/bench-e2e.json docs/bench-e2e.png

Needs the docs extra (pip install 'kvrack[docs]').
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src: str, dst: str) -> None:
    data = json.loads(open(src).read())
    lengths = sorted(data["lengths"], key=int)
    x = [int(n) for n in lengths]
    fig, ax = plt.subplots(figsize=(7, 4))
    for case, label, color in (("recompute", "recompute (no cache has the prefix)", "#999999"),
                               ("dram_hit", "prefix loaded from kvrack's DRAM tier", "#1f77b4"),
                               ("nvme_hit", "prefix loaded from kvrack's NVMe tier (DRAM cold)", "#2ca02c")):
        y = [data["lengths"][n][f"{case}_ttft_s"] for n in lengths]
        ax.plot(x, y, marker="o", label=label, color=color)
        if case != "recompute":
            for n, v in zip(lengths, y):
                ax.annotate(f"{data['lengths'][n][f'{case}_vs_recompute']:.3f}×", (int(n), v), fontsize=7,
                            textcoords="offset points", xytext=(0, 6 if case == "nvme_hit" else -12), ha="center")
    ax.set_yscale("log")
    ax.set_ylim(bottom=min(data["lengths"][n]["dram_hit_ttft_s"] for n in lengths) * 0.6)
    ax.set_xscale("log", base=2)
    ax.set_xticks(x, [str(n) for n in x])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("time to first token (s, log)")
    ax.set_title(f"vLLM {data.get('vllm_version')} + kvrack: TTFT through the OpenAI server, "
                 f"{data.get('cpu_count')} CPU cores", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(dst, dpi=120)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
