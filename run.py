"""Serve ondemand: `python run.py --config config/default.toml --port 8080`."""

from __future__ import annotations

import argparse
import logging
import sys

from aiohttp import web

from app.config import load_config
from app.errors import ConfigError, PluginError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="run.py", description="Serve the ondemand HTTP API.")
    parser.add_argument("--config", help="TOML config file (default: $ONDEMAND_CONFIG, else built-in defaults)")
    parser.add_argument("--host", help="listen address (overrides server.host)")
    parser.add_argument("--port", type=int, help="listen port (overrides server.port)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server_overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    try:
        config = load_config(args.config, overrides={"server": server_overrides} if server_overrides else None)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    from app.web import create_app

    try:
        web.run_app(create_app(config), host=config.server.host, port=config.server.port,
                    shutdown_timeout=config.server.shutdown_timeout, print=None)
    except (ConfigError, PluginError) as exc:
        print(f"startup error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
