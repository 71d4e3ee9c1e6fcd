"""Typed application state: no string keys, no globals."""

from aiohttp import web

from ondemand.config import Config
from ondemand.metrics import Metrics
from ondemand.runtime import Runtime

CONFIG = web.AppKey("config", Config)
RUNTIME = web.AppKey("runtime", Runtime)
METRICS = web.AppKey("metrics", Metrics)
