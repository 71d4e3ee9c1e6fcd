"""Prometheus metrics: one CollectorRegistry per Metrics object (one per app), never the global one.

- `ondemand_http_requests_total{method, route, status}` and
  `ondemand_http_request_duration_seconds{method, route}`: recorded by the web middleware; `route` is
  the route's canonical path (`/api/sessions/{session_id}`), `unmatched` for 404/405, so ids never
  become labels.
- Everything else is read from `Runtime.status()` at scrape time by `RuntimeCollector`, so there is
  nothing to keep in sync: per-namespace hits, misses, fallback reads and writes, dropped writes and
  errors; Redis lifecycle counters (spawns, idle stops, ...); breaker state; pools; store states.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from ondemand.redis.server import RedisState
from ondemand.store.breaker import BreakerState

# The gauge value of each breaker state, and every Redis state: from the enums beside their owners.
BREAKER_STATES = {state.value: index for index, state in enumerate(BreakerState)}
REDIS_STATES = tuple(state.value for state in RedisState)
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# NamespaceStats field -> (metric name without _total, help)
_NAMESPACE_COUNTERS = {
    "hits": ("ondemand_cache_hits", "Reads served from Redis"),
    "durable_hits": ("ondemand_cache_durable_hits", "Reads served from the durable store"),
    "misses": ("ondemand_cache_misses", "Reads that found nothing"),
    "writes": ("ondemand_cache_writes", "Writes requested"),
    "deletes": ("ondemand_cache_deletes", "Ids whose deletion was requested"),
    "fallback_reads": ("ondemand_fallback_reads", "Reads served by the durable store because Redis was unavailable"),
    "fallback_writes": ("ondemand_fallback_writes", "Durable writes that could not reach Redis"),
    "dropped_writes": ("ondemand_dropped_writes", "Cache-only writes lost because Redis was unavailable"),
    "cache_errors": ("ondemand_cache_errors", "Redis errors seen by the dispatcher"),
    "durable_errors": ("ondemand_durable_errors", "Durable store errors seen by the dispatcher"),
    "corrupt_values": ("ondemand_cache_corrupt_values", "Values in Redis that were not valid JSON"),
    "near_hits": ("ondemand_near_cache_hits", "Reads served from the near cache (counted in hits too)"),
    "near_misses": ("ondemand_near_cache_misses", "Reads of near-cached namespaces the near cache could not serve"),
}

# AsideStats field -> (metric name, help), per namespace: get_or_compute (ondemand.store.aside)
_ASIDE_COUNTERS = {
    "loads": ("ondemand_aside_loads", "get_or_compute loader calls that returned"),
    "load_errors": ("ondemand_aside_load_errors", "get_or_compute loader calls that raised"),
    "joins": ("ondemand_aside_joins", "get_or_compute callers that shared a load running in their process"),
    "lease_waits": ("ondemand_aside_lease_waits", "get_or_compute loads that waited for another process's lease"),
    "lease_timeouts": ("ondemand_aside_lease_timeouts", "Lease waits past their bound (the caller loaded itself)"),
    "stale_served": ("ondemand_aside_stale_served", "Values served past their ttl while one refresh ran"),
    "early_refreshes": ("ondemand_aside_early_refreshes", "XFetch refreshes before the ttl"),
    "not_installed": ("ondemand_aside_not_installed", "Loaded values not installed: a write revoked the lease"),
    "negative_cached": ("ondemand_aside_negative_cached", "Not-found results cached (negative_ttl)"),
}

# RedisCounters field -> help; exposed as ondemand_redis_<field>_total
_REDIS_COUNTERS = {
    "spawns": "Redis start attempts (children spawned by the subprocess lifecycle)",
    "ready": "Times Redis became ready",
    "start_failures": "Redis starts that failed",
    "unexpected_exits": "Redis servers that died unexpectedly",
    "idle_stops": "Redis servers stopped for idleness",
    "commands": "Redis commands issued",
    "errors": "Redis command errors",
    "timeouts": "Redis command timeouts",
}


class RuntimeCollector(Collector):
    """Reads `Runtime.status()` at scrape time; yields nothing while the runtime is not started."""

    def __init__(self, status: Callable[[], dict[str, Any] | None]) -> None:
        self._status = status

    def describe(self) -> list[Metric]:
        return []  # names are only known at scrape time; do not collect at registration

    def collect(self) -> Iterator[Metric]:
        status = self._status()
        if status is None:
            return
        yield from _namespace_metrics(status["dispatcher"])
        yield from _redis_metrics(status["redis"])
        yield from _breaker_metrics(status["dispatcher"])
        yield from _error_reply_metrics(status["dispatcher"])
        yield from _storage_metrics(status["storages"])
        yield from _near_metrics(status.get("near_cache"))
        yield from _aside_metrics(status["dispatcher"].get("aside"))


def _namespace_metrics(dispatcher: dict[str, Any]) -> Iterator[Metric]:
    namespaces = dispatcher["namespaces"]
    for field, (name, help_text) in _NAMESPACE_COUNTERS.items():
        family = CounterMetricFamily(name, help_text, labels=["namespace"])
        for namespace, stats in sorted(namespaces.items()):
            family.add_metric([namespace], stats.get(field, 0))
        yield family
    yield GaugeMetricFamily("ondemand_stale_keys_pending", "Keys to delete from Redis before the breaker closes",
                            value=dispatcher.get("stale_keys_pending", 0))


def _aside_metrics(aside: dict[str, Any] | None) -> Iterator[Metric]:
    if not aside:
        return
    namespaces = aside["namespaces"]
    for field, (name, help_text) in _ASIDE_COUNTERS.items():
        family = CounterMetricFamily(name, help_text, labels=["namespace"])
        for namespace, stats in sorted(namespaces.items()):
            family.add_metric([namespace], stats.get(field, 0))
        yield family
    seconds = CounterMetricFamily("ondemand_aside_load_seconds", "Time spent in get_or_compute loader calls",
                                  labels=["namespace"])
    for namespace, stats in sorted(namespaces.items()):
        seconds.add_metric([namespace], stats.get("load_seconds", 0.0))
    yield seconds
    yield GaugeMetricFamily("ondemand_aside_loads_in_flight", "get_or_compute loads running in this process",
                            value=aside.get("loads_in_flight", 0))


def _redis_metrics(redis: dict[str, Any]) -> Iterator[Metric]:
    counters = redis.get("counters", {})
    for field, help_text in _REDIS_COUNTERS.items():
        yield CounterMetricFamily(f"ondemand_redis_{field}", help_text, value=counters.get(field, 0))
    state = GaugeMetricFamily("ondemand_redis_state", "1 for the current state of the on-demand Redis",
                              labels=["state"])
    for name in REDIS_STATES:
        state.add_metric([name], 1 if redis.get("state") == name else 0)
    yield state
    yield GaugeMetricFamily("ondemand_redis_up", "1 while the Redis server is running",
                            value=1 if redis.get("state") == "running" else 0)
    pools = redis.get("pools", {})
    topology = GaugeMetricFamily("ondemand_redis_topology", "1 for the configured Redis topology",
                                 labels=["topology"])
    topology.add_metric([str(redis.get("topology", "standalone"))], 1)
    yield topology
    yield from _cluster_metrics(pools)
    yield GaugeMetricFamily("ondemand_redis_pools", "Named connection pools known", value=len(pools))
    yield GaugeMetricFamily("ondemand_redis_pools_open", "Named connection pools currently open",
                            value=sum(1 for pool in pools.values() if pool.get("open")))


def _cluster_metrics(pools: dict[str, Any]) -> Iterator[Metric]:
    """Each master of a cluster, as the pools' ClusterConnections see it (summed over pools)."""
    nodes: dict[str, dict[str, Any]] = {}
    redirects: dict[str, int] = {}
    for pool in pools.values():
        pipeline = pool.get("pipeline") or {}
        unreachable = set(pipeline.get("unreachable", ()))
        for node in pipeline.get("nodes", ()):
            seen = nodes.setdefault(node["address"], {"up": 1, "slots": 0, "commands": 0})
            seen["slots"] = max(seen["slots"], node.get("slots", 0))
            seen["commands"] += node.get("commands", 0)
            if not node.get("connected") or node["address"] in unreachable:
                seen["up"] = 0
        for kind, count in (pipeline.get("redirects") or {}).items():
            redirects[kind] = redirects.get(kind, 0) + count
    if not nodes:
        return
    up = GaugeMetricFamily("ondemand_cluster_node_up", "1 while a cluster master answers", labels=["address"])
    slots = GaugeMetricFamily("ondemand_cluster_node_slots", "Slots a cluster master serves", labels=["address"])
    commands = CounterMetricFamily("ondemand_cluster_node_commands", "Commands sent to a cluster master",
                                   labels=["address"])
    for address, node in sorted(nodes.items()):
        up.add_metric([address], node["up"])
        slots.add_metric([address], node["slots"])
        commands.add_metric([address], node["commands"])
    redirected = CounterMetricFamily("ondemand_cluster_redirects", "Cluster redirects and retries, by kind",
                                     labels=["kind"])
    for kind, count in sorted(redirects.items()):
        redirected.add_metric([kind], count)
    yield from (up, slots, commands, redirected)


def _breaker_metrics(dispatcher: dict[str, Any]) -> Iterator[Metric]:
    breaker = dispatcher["breaker"]
    yield GaugeMetricFamily("ondemand_breaker_state", "Redis circuit breaker: 0 closed, 1 half-open, 2 open",
                            value=BREAKER_STATES.get(breaker.get("state"), 2))
    yield CounterMetricFamily("ondemand_breaker_opens", "Times the Redis circuit breaker opened",
                              value=breaker.get("opens", 0))


def _error_reply_metrics(dispatcher: dict[str, Any]) -> Iterator[Metric]:
    family = CounterMetricFamily("ondemand_cache_error_replies", "Error replies from the cache, by kind",
                                 labels=["kind"])
    for kind, count in sorted(dispatcher.get("error_replies", {}).items()):
        family.add_metric([kind], count)
    yield family


def _storage_metrics(storages: dict[str, Any]) -> Iterator[Metric]:
    durable = storages.get("durable")
    if durable is None:
        return
    name = str(durable.get("name", "durable"))
    up = GaugeMetricFamily("ondemand_durable_up", "1 while the durable store is up", labels=["storage"])
    up.add_metric([name], 1 if durable.get("state") == "up" else 0)
    yield up


def _near_metrics(near: dict[str, Any] | None) -> Iterator[Metric]:
    """The near cache, when a namespace keeps one: size, installs, invalidations, flushes by cause, refusals."""
    if near is None:
        return
    yield GaugeMetricFamily("ondemand_near_cache_entries", "Entries held in the near cache", value=near["entries"])
    yield GaugeMetricFamily("ondemand_near_cache_bytes", "Bytes the near cache counts (keys, values, overhead)",
                            value=near["bytes"])
    yield CounterMetricFamily("ondemand_near_cache_installs", "Values kept in the near cache", value=near["installs"])
    yield CounterMetricFamily("ondemand_near_cache_invalidations", "Near cache entries dropped by the server's "
                              "invalidations", value=near["invalidations"])
    yield CounterMetricFamily("ondemand_near_cache_evictions", "Near cache entries evicted by its memory bound",
                              value=near["evictions"])
    flushes = CounterMetricFamily("ondemand_near_cache_flushes", "Near cache flushes (of a connection's entries, or "
                                  "all), by cause", labels=["cause"])
    for cause, count in sorted(near["flushes"].items()):
        flushes.add_metric([cause], count)
    yield flushes
    yield GaugeMetricFamily("ondemand_near_cache_tracking_connections", "Connections keeping the near cache coherent",
                            value=near["connections"])
    yield GaugeMetricFamily("ondemand_near_cache_refused", "Servers (or cluster nodes) that refused tracking: no near "
                            "cache there", value=len(near["refused"]))
    yield CounterMetricFamily("ondemand_near_cache_refusals", "Tracking connections refused (RESP3, CLIENT TRACKING, "
                              "or too old a server)", value=near["refusals"])


class HttpStats(Collector):
    """Request counts and latency histograms per route, kept in plain Python numbers.

    prometheus-client's Counter and Histogram take a lock on every inc/observe; with a histogram
    that is several lock round trips per request, measured at ~20 us of a ~120 us cached GET. The
    event loop is single-threaded, so plain ints and lists are safe here; the collector turns them
    into the same metric families at scrape time. Keys are bounded: known methods, route templates
    and status codes.
    """

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int], int] = {}
        # (method, route) -> [per-bucket counts (last: above every bound), sum of seconds]
        self.latency: dict[tuple[str, str], list[Any]] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        method = method if method in HTTP_METHODS else "other"  # clients choose methods: bound the labels
        key = (method, route, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        histogram = self.latency.get(key[:2])
        if histogram is None:
            histogram = self.latency[key[:2]] = [[0] * (len(LATENCY_BUCKETS) + 1), 0.0]
        histogram[0][bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        histogram[1] += seconds

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("ondemand_http_requests", "HTTP requests answered",
                                       labels=["method", "route", "status"])
        for (method, route, status), count in self.requests.items():
            requests.add_metric([method, route, str(status)], count)
        yield requests
        latency = HistogramMetricFamily("ondemand_http_request_duration_seconds", "HTTP request latency",
                                        labels=["method", "route"])
        for (method, route), (counts, total) in self.latency.items():
            cumulative = list(itertools.accumulate(counts))
            buckets = [(str(bound), cumulative[i]) for i, bound in enumerate(LATENCY_BUCKETS)]
            buckets.append(("+Inf", cumulative[-1]))
            latency.add_metric([method, route], buckets, total)
        yield latency


class Metrics:
    """The app's registry, its HTTP metrics and the runtime collector."""

    def __init__(self, status: Callable[[], dict[str, Any] | None] = lambda: None) -> None:
        self.registry = CollectorRegistry()
        self.http = HttpStats()
        self.registry.register(self.http)
        self.registry.register(RuntimeCollector(status))
        self.observe = self.http.observe

    def render(self) -> bytes:
        """The Prometheus text exposition of everything in the registry."""
        return generate_latest(self.registry)
