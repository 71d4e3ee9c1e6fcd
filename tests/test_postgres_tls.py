"""TLS to PostgreSQL, for real: pgserver's PostgreSQL is built without SSL (`ssl = on` is refused by it), so a
TLS terminator the test controls (tests/tls_proxy.py, `postgres=True`: it answers libpq's SSLRequest) sits in
front of it, with certificates the test makes. libpq does the client side: `sslmode=verify-full` in the DSN
reaches every connection of ours (the pool's, the outbox listener's); a server that does not verify is refused
naming the server; an sslmode libpq does not know or a TLS file we cannot use is refused at startup."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ondemand import Runtime
from ondemand.config import redact, redact_url
from ondemand.errors import ConfigError, PostgresUnavailable
from ondemand.preflight import check
from tests.certs import Pki
from tests.tls_proxy import TlsProxy


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.create(tmp_path_factory.mktemp("pgtls") / "ca")


@pytest.fixture
async def front(pg: Any, pki: Pki) -> AsyncIterator[Any]:
    """Make a TLS front for the test's PostgreSQL: `await front(cert, client_ca=None)`."""
    made: list[TlsProxy] = []

    async def make(cert: Any, client_ca: Path | None = None) -> TlsProxy:
        socket = f"{pg.socket_dir}/.s.PGSQL.{pg.port}"
        proxy = await TlsProxy(socket, cert=cert.cert, key=cert.key, client_ca=client_ca, postgres=True).start()
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        await proxy.close()


def durable(make_config: Any, dsn: str) -> Any:
    return make_config({"storage": {"durable": "postgres"},
                        "postgres": {"dsn": dsn, "connect_timeout": 2.0, "statement_timeout": 1.0}})


async def test_verify_full_carries_every_connection_through_tls(front, pki: Pki, make_config) -> None:
    proxy = await front(pki.issue("pg", ["IP:127.0.0.1"]))
    dsn = f"host=127.0.0.1 port={proxy.port} dbname=postgres user=postgres sslmode=verify-full sslrootcert={pki.ca}"
    async with Runtime(durable(make_config, dsn)) as rt:
        await rt.cache.cache_session("s", {"v": 1})  # committed in PostgreSQL, through TLS
        ns = rt.dispatcher.namespace("session")
        assert (await rt.durable_storage.get_entry(ns, "s"))[0] == b'{"v":1}'
        assert rt.durable_storage.status()["state"] == "up"
        for _ in range(200):  # the outbox listener connects on its own: through TLS too
            if proxy.tls_connections >= 2:
                break
            await asyncio.sleep(0.05)
        assert proxy.tls_connections >= 2
    assert proxy.handshake_failures == []


@pytest.mark.parametrize("case", ["unknown CA", "wrong name", "client certificate required"])
async def test_a_server_that_does_not_verify_is_refused_naming_it(case, front, pki: Pki, tmp_path: Path,
                                                                 make_config) -> None:
    stranger = Pki.create(tmp_path / "stranger", "stranger CA")
    if case == "unknown CA":
        issued = stranger.issue("pg", ["IP:127.0.0.1"])
    else:
        names = ["DNS:db.example"] if case == "wrong name" else ["IP:127.0.0.1"]
        issued = pki.issue(f"pg-{case.replace(' ', '-')}", names)
    proxy = await front(issued, client_ca=pki.ca if case == "client certificate required" else None)
    dsn = f"host=127.0.0.1 port={proxy.port} dbname=postgres user=postgres sslmode=verify-full sslrootcert={pki.ca}"
    async with Runtime(durable(make_config, dsn)) as rt:
        ns = rt.dispatcher.namespace("session")
        async with asyncio.timeout(15):  # bounded: connect_timeout + statement_timeout
            with pytest.raises(PostgresUnavailable) as refused:
                await rt.durable_storage.get_entry(ns, "s")
    message = str(refused.value)
    assert message.startswith(f"cannot connect to PostgreSQL at host=127.0.0.1 port={proxy.port} ")
    assert {"unknown CA": "certificate verify failed",
            "wrong name": 'server certificate for "db.example" (and 1 other name) does not match host name "127.0.0.1"',
            "client certificate required": "certificate required"}[case] in message, message

    if case == "client certificate required":  # with one, it serves
        client = pki.issue("pg-client", (), client=True)
        dsn += f" sslcert={client.cert} sslkey={client.key}"
        async with Runtime(durable(make_config, dsn)) as rt:
            await rt.cache.cache_session("s", 1)
            assert await rt.cache.get_session("s") == 1


@pytest.mark.parametrize(("dsn", "error"), [
    ("host=db sslmode=verify-fulll", "sslmode='verify-fulll' is not one of libpq's: disable, allow, prefer, require, "
                                     "verify-ca, verify-full (verify-full checks the server's certificate and name)"),
    ("postgresql://u@db/app?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
     "sslrootcert=/nonexistent/ca.pem: the CA bundle cannot be read: No such file or directory"),
])
async def test_a_tls_setting_libpq_would_refuse_later_is_refused_at_startup(dsn: str, error: str) -> None:
    report = await check(overrides={"storage": {"durable": "postgres"}, "postgres": {"dsn": dsn}}, environ={})
    assert report.error_lines() == [f"configuration error: overrides: postgres.dsn: {error}"]


async def test_a_group_writable_client_key_is_refused_and_sslpassword_is_redacted(pki: Pki, tmp_path: Path,
                                                                                 make_config) -> None:
    client = pki.issue("pg-client", (), client=True)
    client.key.chmod(0o660)
    dsn = f"host=db sslmode=verify-full sslcert={client.cert} sslkey={client.key} sslpassword=k3y-pass"
    with pytest.raises(ConfigError) as refused:
        async with Runtime(durable(make_config, dsn)):
            pass
    assert "sslkey=" in str(refused.value) and "is writable by group or others (mode 0660)" in str(refused.value)
    assert "k3y-pass" not in str(redact(durable(make_config, dsn)))
    assert redact_url("postgresql://u:pw@db/app?sslpassword=k3y-pass&sslmode=verify-full") == (
        "postgresql://u:***@db/app?sslpassword=***&sslmode=verify-full")
