"""Plot hit ratio vs DRAM size per policy from `kvrack sim --sweep ... --json` results.

python docs/plot_sim.py OUT.png NAME=RESULT.json [NAME=RESULT.json ...]
(a no-argument run's JSON holds one sweep per shipped trace; a --trace run's holds one). Needs the docs extra.
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def sweeps(label: str, data: dict) -> list[tuple[str, dict]]:
    if "traces" in data:
        return [(f"{label} {name}", t["sweep"]) for name, t in data["traces"].items() if "sweep" in t]
    return [(label, data["sweep"])]


def main(dst: str, sources: list[str]) -> None:
    panels = []
    for src in sources:
        label, _, path = src.partition("=")
        panels += sweeps(label, json.loads(open(path).read()))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, (title, sw) in zip(axes[0], panels):
        xs = [100 * f for f in sw["capacity_fractions"]]
        for policy, ys in sorted(sw["hit_ratio"].items()):
            ax.plot(xs, ys, marker="o", label=policy, linewidth=2.2 if policy in ("lru", "chain") else 1.2)
        ax.plot(xs, sw["belady"], linestyle="--", color="black", label="offline optimum")
        ax.set_title(title)
        ax.set_xlabel("DRAM size, % of unique blocks")
        ax.set_ylabel("prefix-hit ratio of block accesses")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
