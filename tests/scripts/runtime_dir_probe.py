"""Run by a test under a fault the test process itself cannot be put in (a read-only mount, no CAP_DAC_OVERRIDE).

Serves the app (aiohttp's test server) with `lifecycle.runtime_dir = argv[1]` and a sqlite durable store at
argv[2], makes a few requests, and prints one JSON line: each response's status and body, the error
`on_demand.ensure()` raises (type, code, HTTP status, message), and the log records (tracebacks counted).
"""

import asyncio
import json
import logging
import sys

from aiohttp.test_utils import TestClient, TestServer

from ondemand import load_config
from ondemand.web import RUNTIME, create_app

REQUESTS = [("PUT", "/api/users/u/profile", {"v": 1}), ("GET", "/api/users/u/profile", None),
            ("PUT", "/api/sessions/s", {"v": 1}), ("GET", "/api/sessions/s", None),
            ("GET", "/api/cache/test", None), ("GET", "/readyz", None)]


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def main(runtime_dir: str, sqlite_path: str) -> None:
    records = Records()
    logging.getLogger().addHandler(records)
    logging.getLogger().setLevel(logging.INFO)
    config = load_config(None, environ={}, overrides={
        "storage": {"durable": "sqlite"}, "sqlite": {"path": sqlite_path},
        "lifecycle": {"runtime_dir": runtime_dir, "startup_timeout": 5.0, "shutdown_grace": 1.0},
    })
    result: dict = {"responses": {}, "error": None}
    async with TestClient(TestServer(create_app(config))) as client:
        for method, path, body in REQUESTS:
            resp = await client.request(method, path, json=body)
            result["responses"][f"{method} {path}"] = [resp.status, await resp.json()]
        try:
            await client.app[RUNTIME].on_demand.ensure()
        except Exception as exc:
            result["error"] = {"type": type(exc).__name__, "code": getattr(exc, "code", None),
                               "status": getattr(exc, "http_status", None), "message": str(exc)}
    result["tracebacks"] = sum(1 for r in records.records if r.exc_info)
    result["warnings"] = [r.getMessage() for r in records.records if r.levelno >= logging.WARNING]
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
