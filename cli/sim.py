"""``kvrack sim``: replay a trace against every eviction policy, no daemon needed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import Progress
from rich.table import Table

from kvrack.cli.common import JsonOpt, console, write_json
from kvrack.sizes import parse_size


def sim(json_path: JsonOpt = None,
        trace: Annotated[Path | None, typer.Option("--trace", help="a recorded trace (JSONL); default: the shipped "
                                                   "chat and RAG traces")] = None,
        fmt: Annotated[str, typer.Option("--format", help="auto, kvrack or mooncake")] = "auto",
        capacity_fraction: Annotated[float, typer.Option(min=0.0001, max=1.0, help="DRAM size as a fraction of "
                                                         "the trace's unique blocks")] = 0.1,
        policies: Annotated[str | None, typer.Option(help="comma-separated (default: all)")] = None,
        nvme_fraction: Annotated[float, typer.Option(min=0.0, max=10.0, help="NVMe size as a fraction of the "
                                                     "unique blocks for the write-volume run; 0 skips it")] = 0.5,
        admission: Annotated[str, typer.Option(help="NVMe admission compared with admit-all: reused or demote")]
        = "reused",
        block_tokens: Annotated[int, typer.Option(min=1, help="tokens per block in mooncake traces")] = 512,
        block_bytes: Annotated[str, typer.Option(help="bytes per block, for bytes moved")] = "2MiB",
        sweep: Annotated[str | None, typer.Option(help="also replay at these DRAM fractions (comma-separated), "
                                                  "for plots")] = None,
        generate: Annotated[str | None, typer.Option(help="write a generated trace (chat, rag, zipf, scan) to "
                                                     "--out instead of simulating")] = None,
        out: Annotated[Path | None, typer.Option(help="where --generate writes")] = None,
        ) -> None:
    """Replay a trace against each eviction policy without the daemon's I/O: hit ratio, bytes moved, NVMe writes."""
    from kvrack.bench.sim import report, traces

    if generate is not None:
        if generate not in traces.GENERATORS or out is None:
            raise typer.BadParameter(f"--generate takes one of {', '.join(traces.GENERATORS)} and needs --out")
        reqs = traces.GENERATORS[generate]()
        traces.write(out, reqs)
        console.print(f"wrote {len(reqs)} requests, {traces.unique_blocks(reqs)} unique blocks to {out}")
        return
    if admission not in ("reused", "demote"):
        raise typer.BadParameter("--admission is reused or demote (each is compared with admit-all)")
    try:
        names = report.policy_names(policies)
        fractions = [float(x) for x in sweep.split(",") if x.strip()] if sweep else []
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    nbytes = parse_size(block_bytes)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("sim", total=None)

        def step(label: str) -> None:
            progress.update(task, description=label)

        if trace is None:
            result = report.run_default(capacity_fraction, names, nvme_fraction, admission, nbytes, fractions, step)
            runs = result["traces"]
        else:
            try:
                requests = traces.load(trace, fmt, block_tokens)
            except (OSError, traces.TraceError) as exc:
                console.print(f"[red]{exc}")
                raise typer.Exit(2) from None
            result = report.run_trace(requests, capacity_fraction, names, nvme_fraction, admission, nbytes, fractions,
                                      step)
            result["trace"] = str(trace)
            runs = {trace.name: result}
    table = Table(title=f"kvrack sim: prefix-hit ratio, DRAM = {capacity_fraction:g} x unique blocks")
    table.add_column("policy")
    for name in runs:
        table.add_column(name, justify="right")
    for p in names:
        table.add_row(p, *(f"{r['hit_ratio_by_policy'][p]:.4f}" for r in runs.values()))
    table.add_row("offline optimum", *(f"{r['belady_hit_ratio']:.4f}" for r in runs.values()))
    console.print(table)
    console.print(f"best {result['best_policy']}: {result['best_vs_lru_hit_points']:+.2f} points over lru")
    for name, r in runs.items():
        u = r["reuse"]
        console.print(f"{name}: room over lru {r['max_vs_lru_hit_points']:.2f} points (no eviction: "
                      f"{r['max_hit_ratio']:.4f}); {100 * u['reused_block_share']:.0f}% of blocks read again, "
                      f"top 10% take {100 * u['top10_block_reuse_share']:.0f}% of reuses, "
                      f"{100 * u['reuse_within_10s_10min']:.0f}% of reuses 10 s-10 min after the previous use "
                      f"(median gap {u['reuse_gap_s']['p50']:.0f} s, {u['reuse_gap_requests']['p50']:.0f} requests)")
    for name, r in runs.items():
        if "nvme" in r:
            n = r["nvme"]
            console.print(f"{name}: NVMe writes with admission {n['admission']} "
                          f"{n['admitted']['nvme_write_blocks']} blocks vs admit-all "
                          f"{n['admit_all']['nvme_write_blocks']}: {100 * n['nvme_write_reduction']:.1f}% fewer; "
                          f"hit ratio {n['hit_ratio_admitted']:.4f} vs {n['hit_ratio_admit_all']:.4f}")
    write_json(json_path, result)


