"""Plot `kvrack bench local --json` results: python docs/plot_bench.py docs/bench-local.json docs/bench-local.png

Needs the docs extra (pip install 'kvrack[docs]').
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src: str, dst: str) -> None:
    data = json.loads(open(src).read())
    sizes = sorted(data["sizes"], key=lambda s: data["sizes"][s]["block_bytes"])
    memcpy = [data["sizes"][s]["memcpy_gbs"] for s in sizes]
    put = [data["sizes"][s]["put_gbs"] for s in sizes]
    get = [data["sizes"][s]["get_gbs"] for s in sizes]
    x = range(len(sizes))
    w = 0.27
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar([i - w for i in x], memcpy, w, label="memcpy (numpy.copyto), same run", color="#999999")
    ax.bar(list(x), put, w, label="kvrack put (reserve, copy, commit)", color="#1f77b4")
    ax.bar([i + w for i in x], get, w, label="kvrack get_into (acquire, copy, release)", color="#2ca02c")
    for i, s in enumerate(sizes):
        ax.text(i, put[i], f"{data['sizes'][s]['put_vs_memcpy']:.2f}×", ha="center", va="bottom", fontsize=8)
        ax.text(i + w, get[i], f"{data['sizes'][s]['get_vs_memcpy']:.2f}×", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), [f"{s} blocks" for s in sizes])
    ax.set_ylabel("GB/s")
    ax.set_title(f"kvrack bench local: same-host bandwidth ({data.get('cpu_count', '?')} cores)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
