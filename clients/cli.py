"""The ``kvrack`` command: status of a running daemon, and benchmarks."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from kvrack.clients.client import Client, socket_path_of
from kvrack.clients.errors import KvrackError
from kvrack.daemon.settings import format_size, parse_size

app = typer.Typer(help="kvrack: pooled KV cache for LLM inference.", no_args_is_help=True, add_completion=False)
bench_app = typer.Typer(help="Benchmarks; each figure is a ratio to a baseline measured in the same run.",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")
console = Console()

SocketOpt = Annotated[str | None, typer.Option("--socket", "-s", help="daemon socket (default: the default socket), "
                                                                       "or tcp://HOST:PORT / tls://HOST:PORT "
                                                                       "(token from $KVRACK_TOKEN)")]
JsonOpt = Annotated[Path | None, typer.Option("--json", help="write the results as JSON to this path")]


def write_json(path: Path | None, data: dict[str, Any]) -> None:
    """The convention every bench and sim command follows for ``--json PATH``."""
    if path is not None:
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        console.print(f"wrote {path}")


def size_names(sizes: str, known: dict[str, int]) -> list[str]:
    """The comma-separated ``--sizes`` of a bench, each one it knows."""
    names = [s.strip() for s in sizes.split(",") if s.strip()]
    unknown = [s for s in names if s not in known]
    if unknown or not names:
        raise typer.BadParameter(f"unknown size(s) {unknown}; choose from {', '.join(known)}")
    return names


def _fmt_bytes(n: Any) -> str:
    return format_size(int(n)) if isinstance(n, int) and n and n % 1024 == 0 else str(n)


@app.command()
def status(socket: SocketOpt = None, namespace: str = "default",
           as_json: Annotated[bool, typer.Option("--json", help="print raw stats as JSON")] = False) -> None:
    """Tiers, capacity, use, blocks and hit ratio of a running daemon."""
    try:
        with Client.connect(socket, namespace=namespace, client_name="kvrack-status", timeout=5.0) as client:
            stats = client.stats()
    except (ConnectionError, KvrackError, OSError, ValueError) as exc:
        where = socket if socket and "://" in socket else socket_path_of(socket)
        console.print(f"[red]cannot reach kvrackd at {where}: {exc}")
        raise typer.Exit(1) from None
    if as_json:
        sys.stdout.write(json.dumps(stats, indent=2) + "\n")
        return
    d = stats.get("daemon", {})
    console.print(f"kvrackd {d.get('version', '?')} pid {d.get('pid', '?')} up {d.get('uptime_s', '?')}s, "
                  f"{stats['server']['sessions']} session(s)")
    table = Table(title="tiers")
    for col in ("tier", "capacity", "used", "blocks", "segments", "fragmentation", "hit ratio"):
        table.add_column(col, justify="right" if col != "tier" else "left")
    notes = []
    for t in stats["tiers"]:
        if t.get("degraded"):
            notes.append(f"[yellow]{t['tier']} tier {'unavailable' if t.get('available') is False else 'degraded'}: "
                         f"{t['degraded']}")
        if t.get("available") is False:
            table.add_row(t["tier"], "-", "-", "-", "-", "-", "unavailable")
            continue
        if t.get("present") is False:  # the HBM tier when it is off or there is no GPU
            table.add_row(t["tier"], "-", "-", "-", "-", "-", "absent")
            notes.append(f"[dim]{t['tier']} tier absent: {escape(t.get('reason', ''))}")
            continue
        used = t.get("used_bytes", 0)
        cap = t.get("capacity_bytes", t.get("capacity", 0))
        pct = f" ({100 * used / cap:.1f}%)" if cap else ""
        hit = t.get("hit_ratio")
        segments = f"{t['segments_assigned']}/{t['segments_total']}" if "segments_total" in t else "-"
        frag = f"{t['fragmentation']:.3f}" if "fragmentation" in t else "-"
        table.add_row(t["tier"], _fmt_bytes(cap), f"{used}{pct}", str(t.get("blocks", "-")), segments, frag,
                      "-" if hit is None else f"{hit:.3f}")
    console.print(table)
    for note in notes:
        console.print(note)
    nvme = next((t for t in stats["tiers"] if t["tier"] == "nvme" and t.get("available", True)), None)
    if nvme is not None:
        console.print(f"nvme: pending writes {nvme['pending_writes']}  written {nvme['written_blocks']}  "
                      f"read back {nvme['promoted_blocks']}  read errors {nvme['read_errors']}  "
                      f"write errors {nvme['write_errors']}  evictions {nvme['evictions']}")
    ops = stats["ops"]
    console.print(f"puts {ops['puts']}  evictions {ops['evictions']}  no-space {ops['no_space']}  "
                  f"expired reservations {ops['expired_reservations']}  expired pins {ops['expired_pins']}")


@bench_app.command("local")
def bench_local(socket: SocketOpt = None, json_path: JsonOpt = None,
                sizes: Annotated[str, typer.Option(help="block sizes, comma-separated")] = "64KiB,2MiB,16MiB",
                repeats: Annotated[int, typer.Option(min=1, max=20, help="passes per figure (best kept)")] = 3,
                index_blocks: Annotated[int, typer.Option(min=0, help="blocks for the index memory figure; 0 skips")] = 1_000_000,
                working_set: Annotated[str, typer.Option(help="bytes moved per block size per pass")] = "256MiB",
                ) -> None:
    """Same-host put/get bandwidth vs memcpy, lookup rate, round trip, index memory per block.

    Without --socket it uses the daemon on the default socket if one is listening; with no daemon
    running it starts a private one on a temporary socket and stops it afterwards. The index memory
    figure always comes from a private daemon, so that nothing else moves its RSS.
    """
    from kvrack.clients import bench_local as bl

    names = size_names(sizes, bl.SIZES)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("bench", total=len(names) + 2 + (1 if index_blocks else 0))

        def step(label: str) -> None:
            progress.update(task, description=label, advance=0 if progress.tasks[0].description == "bench" else 1)

        result = bl.run(socket, names, repeats, index_blocks, step, parse_size(working_set))
        progress.update(task, completed=progress.tasks[0].total)
    table = Table(title="kvrack bench local")
    for col in ("figure", "kvrack", "baseline", "ratio", "target"):
        table.add_column(col, justify="left" if col == "figure" else "right")
    for name, s in result["sizes"].items():
        table.add_row(f"put {name} blocks (batch {s['batch']})", f"{s['put_gbs']:.2f} GB/s",
                      f"memcpy {s['memcpy_gbs']:.2f} GB/s", f"{s['put_vs_memcpy']:.2f}", "≥ 0.70" if name == "2MiB" else "")
        table.add_row(f"get {name} blocks (batch {s['batch']})", f"{s['get_gbs']:.2f} GB/s",
                      f"memcpy {s['memcpy_gbs']:.2f} GB/s", f"{s['get_vs_memcpy']:.2f}", "≥ 0.80" if name == "2MiB" else "")
    table.add_row(f"lookup (batch {result['lookup_batch']})", f"{result['lookup_keys_per_s']:,} keys/s", "", "", "≥ 1,000,000")
    table.add_row("round trip p50 / p99", f"{result['rtt_p50_us']} / {result['rtt_p99_us']} µs",
                  f"raw socket {result['raw_socket_rtt_p50_us']} µs", f"{result['rtt_vs_raw_socket']:.2f}", "p50 ≤ 50 µs")
    if "index_bytes_per_block" in result:
        table.add_row(f"index memory ({result['index_blocks']:,} blocks)", f"{result['index_bytes_per_block']} B/block",
                      "", "", "≤ 300")
    console.print(table)
    write_json(json_path, result)


@bench_app.command("nvme")
def bench_nvme(json_path: JsonOpt = None,
               directory: Annotated[Path | None, typer.Option("--dir", help="where to put the test files "
                                                                  "(default: a temporary directory here)")] = None,
               sizes: Annotated[str, typer.Option(help="block sizes, comma-separated")] = "2MiB,256KiB",
               working_set: Annotated[str, typer.Option(help="bytes per block size per pass")] = "512MiB",
               repeats: Annotated[int, typer.Option(min=1, max=20, help="passes per figure (best kept)")] = 2,
               ) -> None:
    """NVMe tier put/get vs raw O_DIRECT writes/reads of the same sizes on the same file system."""
    from kvrack.clients import bench_nvme as bn

    names = size_names(sizes, bn.SIZES)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("bench", total=5 * len(names))
        result = bn.run(str(directory) if directory else None, names, parse_size(working_set), repeats,
                        progress=lambda label: progress.update(task, description=label, advance=1))
    table = Table(title=f"kvrack bench nvme ({result['directory']}, {result['io_threads']} I/O threads)")
    for col in ("figure", "kvrack", "baseline", "ratio", "target"):
        table.add_column(col, justify="left" if col == "figure" else "right")
    for name, s in result["sizes"].items():
        table.add_row(f"put {name} (batch {s['batch']}, sync per batch)", f"{s['put_gbs']:.2f} GB/s",
                      f"raw seq write {s['raw_seq_write_gbs']:.2f} GB/s", f"{s['put_vs_raw']:.2f}",
                      "≥ 0.70" if name == "2MiB" else "")
        table.add_row(f"get {name} (random order)", f"{s['get_gbs']:.2f} GB/s",
                      f"raw random read {s['raw_rand_read_gbs']:.2f} GB/s", f"{s['get_vs_raw']:.2f}",
                      "≥ 0.80" if name == "2MiB" else "")
        table.add_row(f"single {name} get p50 / p99", f"{s['get_p50_us']} / {s['get_p99_us']} µs", "", "", "")
        table.add_row(f"daemon put {name} until durable", f"{s['daemon_put_gbs']:.2f} GB/s",
                      f"raw seq write {s['raw_seq_write_gbs']:.2f} GB/s", f"{s['daemon_put_vs_raw']:.2f}", "")
        table.add_row(f"daemon get_into {name} from NVMe", f"{s['daemon_get_gbs']:.2f} GB/s",
                      f"raw random read {s['raw_rand_read_gbs']:.2f} GB/s", f"{s['daemon_get_vs_raw']:.2f}", "")
        if s["gds_get_gbs"] is not None:
            table.add_row(f"GDS get {name} into GPU memory", f"{s['gds_get_gbs']:.2f} GB/s",
                          f"raw kvikio read {s['raw_gds_read_gbs']:.2f} GB/s", f"{s['gds_get_vs_raw']:.2f}", "")
        else:
            table.add_row(f"GDS get {name} into GPU memory", "-", "", "", s["gds_unavailable"])
    console.print(table)
    write_json(json_path, result)


@bench_app.command("cxl")
def bench_cxl(json_path: JsonOpt = None,
              directory: Annotated[Path | None, typer.Option("--dir", help="where the region files go (default "
                                                                 "/dev/shm; a hugetlbfs mount or a DAX file system "
                                                                 "works too)")] = None,
              sizes: Annotated[str, typer.Option(help="block sizes, comma-separated")] = "2MiB,256KiB,64KiB",
              working_set: Annotated[str, typer.Option(help="bytes per block size (above the LLC)")] = "256MiB",
              repeats: Annotated[int, typer.Option(min=1, max=20, help="passes per figure (best kept)")] = 3,
              ) -> None:
    """CXL region reads by a second process vs memcpy of the same sizes; shared-index lookup rate."""
    from kvrack.clients import bench_cxl as bc

    names = size_names(sizes, bc.SIZES)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("bench", total=len(names) + 1)
        result = bc.run(str(directory) if directory else None, names, parse_size(working_set), repeats,
                        progress=lambda label: progress.update(task, description=label, advance=1))
    prims = result["primitives"]
    table = Table(title=f"kvrack bench cxl ({result['directory']}; flush {prims['flush']}, "
                        f"invalidate {prims['invalidate']})")
    for col in ("figure", "kvrack", "baseline", "ratio", "target"):
        table.add_column(col, justify="left" if col == "figure" else "right")
    for name, s in result["sizes"].items():
        table.add_row(f"get {name}, second process, invalidate + copy + version check", f"{s['get_gbs']:.2f} GB/s",
                      f"memcpy {s['memcpy_gbs']:.2f} GB/s", f"{s['get_vs_memcpy']:.2f}",
                      "≥ 0.80" if name == "2MiB" else "")
        table.add_row(f"get {name} again, unchanged since this process read it (no invalidate)",
                      f"{s['get_repeat_gbs']:.2f} GB/s", f"memcpy {s['memcpy_gbs']:.2f} GB/s",
                      f"{s['get_repeat_vs_memcpy']:.2f}", "")
        table.add_row(f"get {name}, first reads, 64 per read_many call", f"{s['get_batched_gbs']:.2f} GB/s",
                      f"memcpy {s['memcpy_gbs']:.2f} GB/s", f"{s['get_batched_vs_memcpy']:.2f}", "")
        table.add_row(f"get {name}, coherent host (no invalidate)", f"{s['get_coherent_gbs']:.2f} GB/s",
                      f"memcpy {s['memcpy_gbs']:.2f} GB/s", f"{s['get_coherent_vs_memcpy']:.2f}", "")
        table.add_row(f"  bound for first reads: drop {name} of lines ({s['invalidate_us_per_block']:.0f} µs), "
                      "then memcpy", f"{s['invalidate_bound_vs_memcpy']:.2f} of memcpy", "first read vs bound",
                      f"{s['get_vs_invalidate_bound']:.2f}", "")
        table.add_row(f"put {name} (non-temporal stores, writer)", f"{s['put_gbs']:.2f} GB/s", "", "", "")
    table.add_row(f"shared-index lookups (batches of {result['lookup_batch']})",
                  f"{result['cxl_lookup_keys_per_s'] / 1e6:.2f} M keys/s", "", "", "≥ 2 M")
    table.add_row("  same, coherent host", f"{result['cxl_lookup_keys_per_s_coherent'] / 1e6:.2f} M keys/s",
                  "", "", "")
    console.print(table)
    write_json(json_path, result)


@bench_app.command("remote")
def bench_remote(json_path: JsonOpt = None,
                 sizes: Annotated[str, typer.Option(help="block sizes, comma-separated")] = "2MiB,64KiB",
                 working_set: Annotated[str, typer.Option(help="bytes read per pass and block size")] = "256MiB",
                 repeats: Annotated[int, typer.Option(min=1, max=20, help="passes per figure (best kept)")] = 5,
                 host: Annotated[str, typer.Option(help="address of this host to run over (default loopback)")]
                 = "127.0.0.1",
                 ) -> None:
    """Remote get/put over NIXL and the TCP byte stream vs raw NIXL and a raw TCP socket, in one run."""
    from kvrack.clients import bench_remote as br

    names = size_names(sizes, br.SIZES)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("bench", total=2 * len(names) + 1)
        result = br.run(names, parse_size(working_set), repeats, host,
                        progress=lambda label: progress.update(task, description=label, advance=1))
    table = Table(title=f"kvrack bench remote ({result['address']}, {result['batch_bytes'] >> 20} MiB per request)")
    for col in ("figure", "kvrack", "baseline", "ratio", "target"):
        table.add_column(col, justify="left" if col == "figure" else "right")
    for name, s in result["sizes"].items():
        table.add_row(f"get {name} over the TCP byte stream", f"{s['kvrack_tcp_get_gbs']:.2f} GB/s",
                      f"raw socket {s['raw_socket_gbs']:.2f} GB/s", f"{s['tcp_get_vs_raw_socket']:.2f}",
                      "≥ 0.80" if name == "2MiB" else "")
        if "nixl_get_vs_raw_nixl" in s:
            table.add_row(f"get {name} over NIXL (acquire, READ, release)", f"{s['kvrack_nixl_get_gbs']:.2f} GB/s",
                          f"raw NIXL READ {s['raw_nixl_gbs']:.2f} GB/s", f"{s['nixl_get_vs_raw_nixl']:.2f}",
                          "≥ 0.90" if name == "2MiB" else "")
            table.add_row(f"put {name} over NIXL (reserve, WRITE, commit)", f"{s['kvrack_nixl_put_gbs']:.2f} GB/s",
                          "", "", "")
        table.add_row(f"put {name} over the TCP byte stream", f"{s['kvrack_tcp_put_gbs']:.2f} GB/s", "", "", "")
    if result["nixl_unavailable"]:
        table.add_row("NIXL", "-", "", "", result["nixl_unavailable"])
    console.print(table)
    write_json(json_path, result)


@bench_app.command("hbm")
def bench_hbm(json_path: JsonOpt = None,
              sizes: Annotated[str, typer.Option(help="block sizes, comma-separated")] = "2MiB,256KiB",
              working_set: Annotated[str, typer.Option(help="bytes read per pass and block size")] = "256MiB",
              repeats: Annotated[int, typer.Option(min=1, max=20, help="passes per figure (best kept)")] = 5,
              device: Annotated[int, typer.Option(min=0, help="CUDA device")] = 0,
              ) -> None:
    """GPU client reads from the daemon's HBM arena (CUDA IPC, device to device) vs a D2D memcpy, in one run."""
    from kvrack.clients import bench_hbm as bh

    names = size_names(sizes, bh.SIZES)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("bench", total=len(names))
        result = bh.run(names, parse_size(working_set), repeats, device,
                        progress=lambda label: progress.update(task, description=label, advance=1))
    table = Table(title=f"kvrack bench hbm (CUDA device {device})")
    for col in ("figure", "kvrack", "baseline", "ratio"):
        table.add_column(col, justify="left" if col == "figure" else "right")
    for name, s in result["sizes"].items():
        table.add_row(f"get {name} into GPU buffers from HBM (acquire, D2D, release)", f"{s['hbm_get_gbs']:.2f} GB/s",
                      f"D2D memcpy {s['d2d_memcpy_gbs']:.2f} GB/s", f"{s['hbm_get_vs_d2d_memcpy']:.2f}")
        table.add_row(f"get {name} into GPU buffers from DRAM (H2D)", f"{s['dram_to_gpu_get_gbs']:.2f} GB/s", "", "")
    if result["hbm_unavailable"]:
        table.add_row("HBM tier", "-", "", escape(result["hbm_unavailable"]))
    console.print(table)
    write_json(json_path, result)


@bench_app.command("overwrite")
def bench_overwrite(json_path: JsonOpt = None,
                    capacity: Annotated[str, typer.Option(help="DRAM tier of the daemon under test")] = "256MiB",
                    block: Annotated[str, typer.Option(help="bytes per block")] = "256KiB",
                    fills: Annotated[float, typer.Option(min=1.0, max=100.0, help="bytes written, in DRAM "
                                                                                 "capacities")] = 4.0,
                    chain_depth: Annotated[int, typer.Option(min=1, help="blocks per chain (each put names the "
                                                                       "previous block as its parent)")] = 1,
                    ) -> None:
    """Put latency under sustained overwrite (DRAM full), with and without the background evictor."""
    from kvrack.clients import bench_overwrite as bo

    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("bench", total=2)
        result = bo.run(parse_size(capacity), parse_size(block), fills,
                        progress=lambda label: progress.update(task, description=label, advance=1),
                        chain_depth=chain_depth)
    chains = f", chains of {chain_depth}" if chain_depth > 1 else ""
    table = Table(title=f"kvrack bench overwrite ({result['puts']} puts of {_fmt_bytes(result['block_bytes'])} "
                        f"through {_fmt_bytes(result['capacity_bytes'])} of DRAM{chains})")
    for col in ("eviction", "p50", "p90", "p99", "p99.9", "max", "p99 / p50", "target"):
        table.add_column(col, justify="left" if col == "eviction" else "right")
    for name, label, target in (("background", "background evictor (watermarks)", "≤ 2"),
                                ("inline", "each put evicts for itself", "")):
        r = result[name]
        table.add_row(label, *(f"{r[k]:.0f} µs" for k in ("p50_us", "p90_us", "p99_us", "p999_us", "max_us")),
                      f"{r['p99_vs_p50']:.2f}", target)
    console.print(table)
    write_json(json_path, result)


@app.command()
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
    from kvrack.daemon.sim import report, traces

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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
