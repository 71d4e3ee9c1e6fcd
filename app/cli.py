"""The command line behind run.py and the installed `ondemand` script: serve (the default), check-config, status."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import urllib.error
import urllib.request
from typing import Any

from ondemand.config import redact
from ondemand.config.load import load_config
from ondemand.config.secret_files import read_secret
from ondemand.errors import ConfigError, OndemandError, PluginError, one_line
from ondemand.logs import configure_logging
from ondemand.preflight import Report, check

log = logging.getLogger("ondemand.config")

DEFAULT_URL = "http://127.0.0.1:8080"


def _serve_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML config file (default: $ONDEMAND_CONFIG, else built-in defaults)")
    parser.add_argument("--host", help="listen address (overrides server.host)")
    parser.add_argument("--port", type=int, help="listen port (overrides server.port)")
    parser.add_argument("--workers", type=int, help="worker processes sharing the port (overrides server.workers)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def build_parser() -> argparse.ArgumentParser:
    # prog is the name it was invoked by: "ondemand" (the installed script) or "run.py".
    parser = argparse.ArgumentParser(
        prog=os.path.basename(sys.argv[0]) or "ondemand",
        description="ondemand: serve the HTTP API (default), check a config, or show a server's status.",
    )
    _serve_options(parser)
    commands = parser.add_subparsers(dest="command", metavar="{serve,check-config,status}")
    _serve_options(commands.add_parser("serve", help="serve the HTTP API (the default)",
                                       description="Serve the HTTP API. Refuses to start (exit 2, one line per "
                                                   "problem on stderr) on what check-config calls invalid."))
    check = commands.add_parser(
        "check-config", help="check a config as serve would, and print it resolved, secrets redacted",
        description="Check a config file (with the environment applied) as serve does before it listens, "
                    "without opening anything: stdout is the resolved config as JSON, secrets redacted (or, with "
                    "--json, one JSON object with everything); errors, warnings and the server that would run "
                    "go to stderr. Exit 0 when serve would start, 2 when it would refuse (with the same lines).",
    )
    check.add_argument("--config", help="TOML config file (default: $ONDEMAND_CONFIG, else built-in defaults)")
    check.add_argument("--json", action="store_true",
                       help="print one JSON object: valid, source, config, lifecycle, warnings, errors, server")
    status = commands.add_parser(
        "status", help="print the status of a running server",
        description="Fetch GET /api/cache/status from a running server and print it readably. The server is the "
                    "one --config describes (server.host, server.port, server.api_token, the environment "
                    "applied), or --url; --url and --token win over the config.",
    )
    status.add_argument("--config", help="TOML config file the server runs with: its address and token are used")
    status.add_argument("--url", help=f"server base URL (default: from --config, else {DEFAULT_URL})")
    status.add_argument("--token", default=os.environ.get("ONDEMAND_SERVER__API_TOKEN"),
                        help="API token (default: $ONDEMAND_SERVER__API_TOKEN, else the config's)")
    status.add_argument("--token-file", default=os.environ.get("ONDEMAND_SERVER__API_TOKEN_FILE"),
                        help="a file holding the API token, when --token is not given "
                             "(default: $ONDEMAND_SERVER__API_TOKEN_FILE)")
    status.add_argument("--json", action="store_true", help="print the raw JSON document")
    status.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the server")
    return parser


def _preflight(args: argparse.Namespace) -> Report:
    """The checks serve makes before it listens (ondemand.preflight), with --host/--port/--workers applied."""
    server = {key: getattr(args, key) for key in ("host", "port", "workers") if getattr(args, key, None) is not None}
    return asyncio.run(check(args.config, overrides={"server": server} if server else None))


def serve(args: argparse.Namespace) -> int:
    report = _preflight(args)
    if not report.valid or report.config is None:
        for line in report.error_lines():
            print(line, file=sys.stderr)
        return 2
    config = report.config
    configure_logging(args.log_level, config.server.log_format)
    for warning in report.warnings:  # once, here: not again in each worker
        log.warning("%s", warning)
    from ondemand.host.workers import serve_workers

    try:
        return serve_workers(config)
    except OndemandError as exc:  # ConfigError, PluginError, ProcessError, StartupError (a busy port...)
        print(f"startup error: {one_line(exc)}", file=sys.stderr)
        return 2


def check_config(args: argparse.Namespace) -> int:
    """stdout: only JSON (the resolved config, or with --json the whole report); the rest on stderr."""
    report = _preflight(args)
    if report.valid:
        print(f"{report.source or 'built-in defaults'}: valid", file=sys.stderr)
    for line in report.error_lines():
        print(line, file=sys.stderr)
    if report.server is not None:
        print(report.server.describe(), file=sys.stderr)
        for note in report.server.notes:
            print(f"  {note}", file=sys.stderr)
    elif report.valid:
        print(f"server: none of ours (lifecycle {report.lifecycle!r})", file=sys.stderr)
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.json:
        print(json.dumps(report.to_json(), indent=2, sort_keys=True))
    elif report.valid and report.config is not None:
        print(json.dumps(redact(report.config), indent=2, sort_keys=True))
    return 0 if report.valid else 2


def _seconds(value: Any) -> str:
    return "-" if value is None else f"{value:.1f} s"


def format_status(doc: dict[str, Any]) -> str:
    """A readable rendering of GET /api/cache/status."""
    redis = doc["redis"]
    lines = [
        f"service      ondemand, up {_seconds(doc.get('uptime_seconds'))}",
        f"redis        {redis['lifecycle']}: {redis['state']}"
        + (f", pid {redis['pid']}" if redis.get("pid") else "")
        + (f", up {_seconds(redis['uptime_seconds'])}" if redis.get("uptime_seconds") is not None else "")
        + (f", idle stop in {_seconds(redis['idle_deadline_in'])}" if redis.get("idle_deadline_in") is not None
           else ""),
        f"endpoint     {redis.get('endpoint') or '-'}",
    ]
    if redis.get("binary"):
        lines.append(f"server       {redis['binary']}")
    for warning in redis.get("binary_warnings") or []:
        lines.append(f"WARNING      {warning}")
    if redis.get("binary_unreachable_advisories"):
        lines.append("advisories   " + "; ".join(redis["binary_unreachable_advisories"])
                     + " (known, not reachable as we run it)")
    if redis.get("server_version"):
        lines.append(f"version      {redis['server_version']}")
    if redis.get("last_error"):
        lines.append(f"last error   {_indented(redis['last_error'])}")
    counters = redis.get("counters", {})
    lines.append("counters     " + ", ".join(f"{k} {v}" for k, v in counters.items()))
    for name, pool in redis.get("pools", {}).items():
        pipe = pool.get("pipeline") or {}
        lines.append(
            f"pool {name:<8}{'open' if pool['open'] else 'closed'}, {pool['leases']} leases, "
            f"{pipe.get('commands', 0)} commands in {pipe.get('batches', 0)} batches, keep_alive {pool['keep_alive']} s"
        )
    durable = (doc.get("storages") or {}).get("durable")
    if durable:
        lines.append(f"durable      {durable.get('name', 'durable')}: {durable.get('state')}"
                     + (f" (pid {durable['pid']})" if durable.get("pid") else "")
                     + (f", {durable['server_version']}" if durable.get("server_version") else ""))
        if durable.get("last_error") and durable.get("state") != "up":
            lines.append(f"durable error {_indented(durable['last_error'])}")
    dispatcher = doc.get("dispatcher") or {}
    breaker = dispatcher.get("breaker") or {}
    if breaker:
        lines.append(f"breaker      {breaker.get('state')}, opened {breaker.get('opens', 0)} times")
        if breaker.get("state") != "closed" and breaker.get("last_reason"):
            lines.append(f"breaker why  {_indented(breaker['last_reason'])}")
    for name, stats in (dispatcher.get("namespaces") or {}).items():
        lines.append(
            f"ns {name:<10}hits {stats['hits']}, durable hits {stats['durable_hits']}, misses {stats['misses']}, "
            f"fallback reads {stats['fallback_reads']}, dropped writes {stats['dropped_writes']}"
        )
    lines.append("plugins      " + ", ".join(doc.get("plugins", [])))
    return "\n".join(lines)


def _indented(text: str) -> str:
    """A multi-line error under its label: every line after the first indented like the values."""
    return text.replace("\n", "\n" + " " * 13)


def _server_of(args: argparse.Namespace) -> tuple[str, str | None]:
    """The base URL and token `status` uses: --url and --token (or --token-file), else what --config says
    (ConfigError)."""
    url, token = args.url, args.token
    if token is None and args.token_file:
        token = read_secret(args.token_file, source="--token-file", key="server.api_token")
    if args.config is not None and (url is None or token is None):
        server = load_config(args.config).server
        if url is None:
            host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(server.host, server.host)
            url = f"http://{f'[{host}]' if ':' in host else host}:{server.port}"
        if token is None:
            token = server.api_token
    return url or DEFAULT_URL, token


def status(args: argparse.Namespace) -> int:
    try:
        url, token = _server_of(args)
    except (ConfigError, PluginError) as exc:
        print(f"configuration error: {one_line(exc)}", file=sys.stderr)
        return 2
    request = urllib.request.Request(url.rstrip("/") + "/api/cache/status")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as resp:
            doc = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        print(f"{url}: HTTP {exc.code}: {exc.read().decode(errors='replace')[:500]}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"{url}: cannot fetch status: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(doc, indent=2) if args.json else format_status(doc))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check-config":
        return check_config(args)
    if args.command == "status":
        return status(args)
    return serve(args)
