"""Redis: the client side of the cache and the on-demand server around it.

A lifecycle author imports from here: `Lifecycle` (the protocol), `WithoutProcess` (its defaults for a
lifecycle that owns no process), `LifecycleContext` (what a factory gets), `RedisEndpoint` and
`RespConnection` (one-shot commands, for probes), `TlsOptions` and `TlsSettings` (TLS to an endpoint: an
endpoint with `tls=` speaks TLS on every kind of connection). The modules: `endpoint`, `tls`, `lifecycle`, `resp`,
`connection` (the protocol of the cache's connections), `pipeline` (automatic pipelining on one
connection), `cluster` and `routing` (one pipelined connection per master, routed by slot), `pools`
(named pools), `server` (OnDemandRedis: the start/stop state machine).
"""

from ondemand.redis.endpoint import RedisEndpoint
from ondemand.redis.lifecycle import Lifecycle, LifecycleContext, LifecycleFactory, WithoutProcess
from ondemand.redis.resp import RespConnection, probe
from ondemand.redis.tls import TlsOptions, TlsSettings

__all__ = ["Lifecycle", "LifecycleContext", "LifecycleFactory", "RedisEndpoint", "RespConnection", "TlsOptions",
           "TlsSettings", "WithoutProcess", "probe"]
