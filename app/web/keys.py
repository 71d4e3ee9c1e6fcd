"""Typed application state: no string keys, no globals."""

from aiohttp import web

from ondemand.config import Config
from ondemand.metrics import Metrics
from ondemand.runtime import Runtime

CONFIG = web.AppKey("config", Config)
RUNTIME = web.AppKey("runtime", Runtime)
METRICS = web.AppKey("metrics", Metrics)
# The OpenAPI document of the app our routes are registered on, its paths without the prefix.
OPENAPI = web.AppKey("openapi", dict)
