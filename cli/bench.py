"""``kvrack bench ...``: each figure a ratio to a baseline measured in the same run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from kvrack.bench.targets import verdict
from kvrack.cli.common import AddressOpt, JsonOpt, console, fmt_bytes, size_names, write_json
from kvrack.sizes import parse_size

bench_app = typer.Typer(help="Benchmarks; each figure is a ratio to a baseline measured in the same run.",
                        no_args_is_help=True)


@bench_app.command("local")
def bench_local(address: AddressOpt = None, json_path: JsonOpt = None,
                sizes: Annotated[str, typer.Option(help="block sizes, comma-separated")] = "64KiB,2MiB,16MiB",
                repeats: Annotated[int, typer.Option(min=1, max=20, help="passes per figure (best kept)")] = 3,
                index_blocks: Annotated[int, typer.Option(min=0, help="blocks for the index memory figure; 0 skips")] = 1_000_000,
                working_set: Annotated[str, typer.Option(help="bytes moved per block size per pass")] = "256MiB",
                admin_load: Annotated[bool, typer.Option(
                    "--admin-load", help="meanwhile, scrape /metrics every second and poll /v1/stats ten times a "
                                         "second from another process (what an operator's tools cost)")] = False,
                events: Annotated[bool, typer.Option(
                    "--events", help="the private daemon publishes KV events and a router's subscriber in another "
                                     "process indexes them")] = False,
                ) -> None:
    """Same-host put/get bandwidth vs memcpy, lookup rate, round trip, index memory per block.

    It starts a private daemon (DRAM tier only) and stops it afterwards. With --address it measures that
    running daemon instead, with whatever tiers it has (write-through to NVMe included), and deletes every
    block it stored. The index memory figure always comes from a private daemon, so that nothing else moves
    its RSS.
    """
    from kvrack.bench import local as bl

    names = size_names(sizes, bl.SIZES)
    if address is not None:
        console.print(f"[yellow]measuring the running daemon at {address}: its configuration (NVMe write-through, "
                      "other clients) is in the figures; the blocks stored here are deleted afterwards")
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("bench", total=len(names) + 2 + (1 if index_blocks else 0))

        def step(label: str) -> None:
            progress.update(task, description=label, advance=0 if progress.tasks[0].description == "bench" else 1)

        result = bl.run(address, names, repeats, index_blocks, step, parse_size(working_set), admin_load, events)
        progress.update(task, completed=progress.tasks[0].total)
    checks = result["checks"]
    table = Table(title=f"kvrack bench local ({'private daemon' if address is None else address})")
    for col in ("figure", "kvrack", "baseline", "ratio", "target"):
        table.add_column(col, justify="left" if col == "figure" else "right")
    ref = "2MiB" if "2MiB" in result["sizes"] else next(iter(result["sizes"]), None)
    for name, s in result["sizes"].items():
        table.add_row(f"put {name} blocks (batch {s['batch']})", f"{s['put_gbs']:.2f} GB/s",
                      f"memcpy {s['memcpy_gbs']:.2f} GB/s", f"{s['put_vs_memcpy']:.2f}",
                      verdict(checks, "put_vs_memcpy") if name == ref else "")
        table.add_row(f"get {name} blocks (batch {s['batch']})", f"{s['get_gbs']:.2f} GB/s",
                      f"memcpy {s['memcpy_gbs']:.2f} GB/s", f"{s['get_vs_memcpy']:.2f}",
                      verdict(checks, "get_vs_memcpy") if name == ref else "")
    table.add_row(f"lookup (batch {result['lookup_batch']})", f"{result['lookup_keys_per_s']:,} keys/s",
                  f"dict {result['dict_lookup_keys_per_s']:,} keys/s", f"{result['lookup_vs_dict']:.3f}",
                  verdict(checks, "lookup_vs_dict"))
    table.add_row("round trip p50 / p99", f"{result['rtt_p50_us']} / {result['rtt_p99_us']} µs",
                  f"raw socket {result['raw_socket_rtt_p50_us']} µs", f"{result['rtt_vs_raw_socket']:.2f}",
                  verdict(checks, "rtt_vs_raw_socket"))
    if "index_bytes_per_block" in result:
        table.add_row(f"index memory ({result['index_blocks']:,} blocks held)",
                      f"{result['index_bytes_per_block']} B/block", "", "", verdict(checks, "index_bytes_per_block"))
    console.print(table)
    failed = [name for name, c in checks.items() if not c["pass"]]
    console.print(f"[red]below target: {', '.join(failed)}" if failed else "[green]every figure meets its target")
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
    from kvrack.bench import nvme as bn

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
    from kvrack.bench import cxl as bc

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
                  f"{result['cxl_lookup_keys_per_s'] / 1e6:.2f} M keys/s",
                  f"dict {result['dict_lookup_keys_per_s'] / 1e6:.2f} M keys/s", f"{result['cxl_lookup_vs_dict']:.3f}",
                  "≥ 0.07")
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
    from kvrack.bench import remote as br

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
    from kvrack.bench import hbm as bh

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
    from kvrack.bench import overwrite as bo

    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("bench", total=2)
        result = bo.run(parse_size(capacity), parse_size(block), fills,
                        progress=lambda label: progress.update(task, description=label, advance=1),
                        chain_depth=chain_depth)
    chains = f", chains of {chain_depth}" if chain_depth > 1 else ""
    table = Table(title=f"kvrack bench overwrite ({result['puts']} puts of {fmt_bytes(result['block_bytes'])} "
                        f"through {fmt_bytes(result['capacity_bytes'])} of DRAM{chains})")
    for col in ("eviction", "p50", "p90", "p99", "p99.9", "max", "p99 / p50", "target"):
        table.add_column(col, justify="left" if col == "eviction" else "right")
    for name, label, target in (("background", "background evictor (watermarks)", "≤ 2"),
                                ("inline", "each put evicts for itself", "")):
        r = result[name]
        table.add_row(label, *(f"{r[k]:.0f} µs" for k in ("p50_us", "p90_us", "p99_us", "p999_us", "max_us")),
                      f"{r['p99_vs_p50']:.2f}", target)
    console.print(table)
    write_json(json_path, result)




@bench_app.command("peers")
def bench_peers(json_path: JsonOpt = None,
                systems: Annotated[str, typer.Option(help="systems to run, comma-separated (those that cannot run "
                                                        "here are reported with the reason)")]
                = "kvrack-shm,kvrack-tcp,kvrack-nixl,redis-unix,redis-tcp,mooncake-tcp,lmcache",
                sizes: Annotated[str, typer.Option(help="block sizes, comma-separated")] = "64KiB,256KiB,2MiB",
                batches: Annotated[str, typer.Option(help="blocks per request, comma-separated")] = "1,16,64",
                working_set: Annotated[str, typer.Option(help="bytes written per cell (at most 4096 blocks)")]
                = "512MiB",
                repeats: Annotated[int, typer.Option(min=1, max=10, help="passes per cell (best kept per phase)")]
                = 2,
                replay_trace: Annotated[str, typer.Option(help="kvrack sim generator of the replay: chat, rag, "
                                                               "zipf, scan")] = "chat",
                replay_requests: Annotated[int, typer.Option(min=1, help="requests of the replay")] = 800,
                replay_memory: Annotated[str, typer.Option(help="memory each system gets for the replay")]
                = "128MiB",
                replay_policies: Annotated[str, typer.Option(help="kvrack's replay again under these dram.policy "
                                                                  "values (comma-separated; '' for none)")]
                = "s3fifo",
                lmcache: Annotated[Path | None, typer.Option(help="LMCache's `lmcache` command (default: on PATH, "
                                                                  "else .venv-lmcache/bin/lmcache)")] = None,
                lmcache_requests: Annotated[int, typer.Option(min=2, max=100, help="requests per LMCache cell")]
                = 12,
                ) -> None:
    """kvrack beside Redis, LMCache and Mooncake Store: one workload, each system's own client, same run."""
    from kvrack.bench.peers import lmcache as lm
    from kvrack.bench.peers import run as bp
    from kvrack.bench.peers.workload import SIZES, Workload

    chosen = [s.strip() for s in systems.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in (*bp.SYSTEMS, "lmcache")]
    if unknown or not chosen:
        raise typer.BadParameter(f"unknown system(s) {unknown}; choose from {', '.join((*bp.SYSTEMS, 'lmcache'))}")
    from kvrack.daemon.policies import POLICIES

    policies = [p.strip() for p in replay_policies.split(",") if p.strip()]
    if any(p not in POLICIES for p in policies):
        raise typer.BadParameter(f"unknown dram.policy in {replay_policies!r}; choose from {', '.join(sorted(POLICIES))}")
    if replay_trace not in ("chat", "rag", "zipf", "scan"):
        raise typer.BadParameter(f"unknown replay trace {replay_trace!r}; choose chat, rag, zipf or scan")
    try:
        batch_sizes = [int(b) for b in batches.split(",") if b.strip()]
    except ValueError:
        raise typer.BadParameter(f"batches must be integers, got {batches!r}") from None
    if not batch_sizes or min(batch_sizes) < 1:
        raise typer.BadParameter("batches must be positive integers")
    work = Workload(sizes=size_names(sizes, SIZES), batches=batch_sizes, working_set=parse_size(working_set),
                    replay_trace=replay_trace, replay_requests=replay_requests,
                    replay_memory=parse_size(replay_memory),
                    replay_policies=policies)
    command = str(lmcache) if lmcache else lm.default_command()
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("bench", total=None)
        result = bp.run([s for s in chosen if s != "lmcache"] + (["lmcache"] if "lmcache" in chosen else []),
                        work, repeats, command, lmcache_requests,
                        progress=lambda label: progress.update(task, description=label))
    _peers_tables(result)
    write_json(json_path, result)


def _peers_tables(result: dict[str, Any]) -> None:
    table = Table(title="kvrack bench peers: GB/s (p99 per request) by block size and batch")
    for col in ("system", "cell", "write", "read", "mixed", "CPU s/GB (read)"):
        table.add_column(col, justify="left" if col in ("system", "cell") else "right")
    for name, system in result["systems"].items():
        if "unavailable" in system:
            table.add_row(name, "-", escape(system["unavailable"]), "", "", "")
            continue
        for cell, c in system["cells"].items():
            table.add_row(name, cell, *(f"{c[p]['gbs']:.2f} ({c[p]['p99_us'] / 1000:.1f} ms)"
                                        for p in ("write", "read", "mixed")), f"{c['read']['cpu_s_per_gb']}")
    console.print(table)
    replay = Table(title="prefix-reuse replay, equal memory")
    for col in ("system", "hit ratio", "GB/s", "CPU s/GB", "memory / held byte"):
        replay.add_column(col, justify="left" if col == "system" else "right")
    for name, system in result["systems"].items():
        if "replay" in system:
            r = system["replay"]
            replay.add_row(name, f"{r['hit_ratio']}", f"{r['gbs']}", f"{r['cpu_s_per_gb']}",
                           f"{r['memory_bytes_per_held_byte']}")
            for policy, r in system.get("replay_by_policy", {}).items():
                replay.add_row(f"{name} (dram.policy={policy})", f"{r['hit_ratio']}", f"{r['gbs']}",
                               f"{r['cpu_s_per_gb']}", f"{r['memory_bytes_per_held_byte']}")
    console.print(replay)
    lmc = result.get("lmcache")
    if lmc:
        if "unavailable" in lmc:
            console.print(f"LMCache: not run: {escape(lmc['unavailable'])}")
        else:
            t = Table(title="LMCache server vs kvrack paged-KV API (p50 per request)")
            for col in ("cell", "LMCache get", "kvrack get", "speed-up", "LMCache put", "kvrack put", "speed-up"):
                t.add_column(col, justify="left" if col == "cell" else "right")
            for cell, theirs in lmc["lmcache"].items():
                ours = lmc["kvrack"][cell]
                t.add_row(cell, f"{theirs['get_p50_ms']} ms", f"{ours['get_p50_ms']} ms",
                          f"{theirs.get('kvrack_get_speedup')}", f"{theirs['store_p50_ms']} ms",
                          f"{ours['store_p50_ms']} ms", f"{theirs.get('kvrack_put_speedup')}")
            console.print(t)
    checks = result["checks"]
    for name in ("vs_redis_get_2mib", "vs_redis_put_2mib", "vs_lmcache_get_2mib", "vs_mooncake_get_2mib"):
        value = result.get(name)
        why = result.get(f"{name}_reason")
        console.print(f"{name}: {value if value is not None else 'null'} "
                      f"{verdict(checks, name) if value is not None else escape(why or '')}")


@bench_app.command("e2e")
def bench_e2e(json_path: JsonOpt = None,
              lengths: Annotated[str, typer.Option(help="prompt lengths in tokens, comma-separated")]
              = "512,2048,4096,8192",
              repeats: Annotated[int, typer.Option(min=1, max=10, help="runs per figure (the median is kept)")] = 2,
              model_dir: Annotated[Path | None, typer.Option(help="where the random model is built (reused)")] = None,
              peers: Annotated[bool, typer.Option("--peers", help="the same prompts through LMCache's vLLM connector "
                                                                  "and vLLM's native CPU offloading too, and a "
                                                                  "multi-turn replay with equal memory")] = False,
              replay_requests: Annotated[int, typer.Option(min=1, max=500, help="--peers: requests of the "
                                                                                "multi-turn replay")] = 40,
              replay_memory: Annotated[str, typer.Option(help="--peers: each system's CPU tier in the replay")]
              = "256MiB",
              ) -> None:
    """Time to first token through vLLM's OpenAI server: recompute vs a prefix from kvrack's DRAM or NVMe tier."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        console.print("[red]kvrack bench e2e needs vLLM (the vllm extra): `make test-vllm` builds .venv-vllm; run "
                      "`.venv-vllm/bin/kvrack bench e2e` (with --peers: `make bench-e2e-peers`)")
        raise typer.Exit(2) from None
    if peers:
        _bench_e2e_peers(json_path, [int(x) for x in lengths.split(",") if x.strip()], repeats, model_dir,
                         replay_requests, parse_size(replay_memory))
        return
    from kvrack.bench import e2e

    sizes = [int(x) for x in lengths.split(",") if x.strip()]
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("bench", total=None)
        result = e2e.run(sizes, repeats, str(model_dir) if model_dir else None,
                         progress=lambda label: progress.update(task, description=label))
    checks = result["checks"]
    table = Table(title=f"kvrack bench e2e (vLLM {result.get('vllm_version')}, TTFT, streaming, median of "
                        f"{repeats}+)")
    for col in ("prompt", "recompute", "from DRAM", "ratio", "from NVMe", "ratio", "in kvrack", "loaded"):
        table.add_column(col, justify="right")
    for n, r in result["lengths"].items():
        table.add_row(n, f"{r['recompute_ttft_s']:.3f} s", f"{r['dram_hit_ttft_s']:.3f} s",
                      f"{r['dram_hit_vs_recompute']:.3f}", f"{r['nvme_hit_ttft_s']:.3f} s",
                      f"{r['nvme_hit_vs_recompute']:.3f}", f"{r['dram_hit_kvrack_s'] * 1000:.1f} ms",
                      f"{r['prompt_tokens_loaded_share']:.3f}")
    console.print(table)
    console.print(f"4K prefix from DRAM vs recompute: {result.get('ttft_hit_vs_recompute_4k')} "
                  f"({verdict(checks, 'ttft_hit_vs_recompute_4k')}); loaded share "
                  f"{result.get('prompt_tokens_loaded_share_4k')} ({verdict(checks, 'prompt_tokens_loaded_share_4k')}); "
                  f"greedy tokens identical: {result['greedy_tokens_identical']}")
    write_json(json_path, result)


def _bench_e2e_peers(json_path: Path | None, lengths: list[int], repeats: int, model_dir: Path | None,
                     replay_requests: int, replay_memory: int) -> None:
    from kvrack.bench import e2e_peers

    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("bench", total=None)
        result = e2e_peers.run(lengths, repeats, str(model_dir) if model_dir else None, replay_requests,
                               replay_memory, progress=lambda label: progress.update(task, description=label))
    table = Table(title=f"kvrack bench e2e --peers (vLLM {result['vllm_version']}): TTFT on a prefix hit")
    for col in ("system", "prompt", "recompute", "CPU tier hit", "disk tier hit", "cached tokens"):
        table.add_column(col, justify="left" if col == "system" else "right")
    fmt = lambda v: f"{v:.3f} s" if isinstance(v, (int, float)) else "-"  # noqa: E731
    for name, system in result["systems"].items():
        for n, r in system.get("lengths", {}).items():
            table.add_row(name, n, fmt(r["recompute_ttft_s"]), fmt(r["cpu_hit_ttft_s"]), fmt(r.get("disk_hit_ttft_s")),
                          f"{r['cpu_hit_cached_tokens']}")
    console.print(table)
    for name, system in result["systems"].items():
        if "unavailable" in system:
            console.print(f"{name}: not run: {escape(system['unavailable'])}")
    for name, system in result["systems"].items():
        if "replay" in system:
            r = system["replay"]
            console.print(f"replay, {fmt_bytes(result['replay_memory_bytes'])} each: {name} supplied "
                          f"{r['hit_ratio']} of {r['prompt_tokens']} prompt tokens")
    for key in ("ttft_vs_lmcache_4k", "ttft_disk_vs_lmcache_4k", "ttft_vs_vllm_offload_4k"):
        value = result.get(key)
        console.print(f"{key}: {value if value is not None else 'null'} "
                      f"{verdict(result['checks'], key) if value is not None else escape(result.get(key + '_reason', ''))}")
    write_json(json_path, result)
