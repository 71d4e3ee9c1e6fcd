"""ondemand's aiohttp layer: `setup(app, config, ...)` adds it to your app, `create_app(config)` is our server's.

    app = web.Application()
    ondemand.web.setup(app, config, routes="/ondemand")   # our HTTP API, status page and probes there

    async def handler(request):
        runtime = ondemand.web.get_runtime(request)        # or request.app[ondemand.web.RUNTIME]

    ondemand.web.run_app(app, config)    # or web.run_app(app): see OndemandRunner for what changes
"""

from __future__ import annotations

from ondemand.web.keys import CONFIG, METRICS, RUNTIME
from ondemand.web.mount import create_app, get_runtime, setup
from ondemand.web.routes import check_namespaces
from ondemand.web.serving import OndemandRunner, run_app

__all__ = ["CONFIG", "METRICS", "RUNTIME", "OndemandRunner", "check_namespaces", "create_app", "get_runtime",
           "run_app", "setup"]
