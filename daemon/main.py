"""``kvrackd``: parse the command line, load the settings, run the daemon (``kvrack.daemon.daemon``)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from kvrack import __version__
from kvrack.daemon.daemon import Daemon, TierError
from kvrack.daemon.settings import ConfigError, example_toml, load_config

log = logging.getLogger("kvrackd")


def _install_loop() -> None:
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # uvloop is a dependency; plain asyncio still works
        log.warning("uvloop is not available; using the default asyncio loop")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvrackd", description="kvrack: a per-rack KV-cache pool daemon.")
    parser.add_argument("--config", metavar="PATH", help="TOML config file (default: embedded defaults)")
    parser.add_argument("--socket", metavar="PATH", help="override server.socket_path")
    parser.add_argument("--set", metavar="NAME=VALUE", action="append", default=[], help="override any setting")
    parser.add_argument("--print-config", action="store_true", help="print the effective settings as TOML and exit")
    parser.add_argument("--write-example", metavar="PATH", help="write the documented example config and exit")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    parser.add_argument("--version", action="version", version=f"kvrackd {__version__}")
    args = parser.parse_args(argv)

    if args.write_example:
        Path(args.write_example).write_text(example_toml())
        return 0
    overrides: dict[str, object] = {}
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set expects NAME=VALUE, got {item!r}")
        overrides[name.strip()] = value.strip()
    if args.socket:
        overrides["server.socket_path"] = args.socket
    if args.log_level:
        overrides["log.level"] = args.log_level
    try:
        config = load_config(args.config, overrides=overrides)
    except ConfigError as exc:
        print(f"kvrackd: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        for warning in config.warnings:
            print(f"kvrackd: warning: {warning}", file=sys.stderr)
        sys.stdout.write(config.to_toml())
        return 0

    logging.basicConfig(level=config.log.level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.info("kvrackd %s starting (pid %d, config: %s)", __version__, os.getpid(), config.origin())
    for warning in config.warnings:
        log.warning("%s", warning)
    daemon = Daemon(config)
    try:
        daemon.claim()
        daemon.open()
    except TierError as exc:
        log.error("%s", exc)
        daemon.close()
        return 1
    except (OSError, ValueError) as exc:
        log.error("cannot open tiers: %s", exc)
        daemon.close()
        return 1
    _install_loop()
    try:
        asyncio.run(daemon.serve())
    except RuntimeError as exc:
        log.error("%s", exc)
        return 1
    finally:
        daemon.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
