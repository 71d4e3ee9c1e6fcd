"""Typed application state: no string keys, no globals."""

from aiohttp import web

from app.config import Config
from app.metrics import Metrics
from app.runtime import Runtime

CONFIG = web.AppKey("config", Config)
RUNTIME = web.AppKey("runtime", Runtime)
METRICS = web.AppKey("metrics", Metrics)
