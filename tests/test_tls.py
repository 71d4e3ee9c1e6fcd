"""TLS to Redis, for real: the bundled Valkey has no TLS, so a TLS terminator the test controls
(tests/tls_proxy.py) sits in front of it, with certificates the test makes (tests/certs.py).

What a user relies on: a rediss:// URL (or the TLS keys) carries every connection of ours through TLS, the
cache's and `with_connection`'s; a certificate that does not verify, a name it does not carry, a client
certificate the server wants and we lack, a server that speaks no TLS: each is refused with one clear error
naming the endpoint and the reason, within the connect timeout, never a hang; a bad TLS setting is a
ConfigError before anything connects.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ondemand import Runtime
from ondemand.errors import ConfigError, RedisUnavailable
from ondemand.preflight import check
from ondemand.redis.endpoint import RedisEndpoint
from ondemand.redis.tls import TlsOptions
from tests.certs import Pki
from tests.support import PlainServer, plain_server
from tests.tls_proxy import TlsProxy


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.create(tmp_path_factory.mktemp("tls") / "ca")


@pytest.fixture(scope="module")
def stranger(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA nobody trusts."""
    return Pki.create(tmp_path_factory.mktemp("tls") / "stranger", "stranger CA")


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[PlainServer]:
    async with plain_server(tmp_path / "redis") as running:
        yield running


def external(url: str, **lifecycle: Any) -> dict[str, Any]:
    return {"lifecycle": {"plugin": "external", "redis_url": url, **lifecycle}, "redis": {"connect_timeout": 1.0}}


async def refusal(rt: Runtime) -> str:
    """What a first use of Redis says when it cannot be had: bounded, a typed error (and reads just miss)."""
    async with asyncio.timeout(10):
        with pytest.raises(RedisUnavailable) as failed:
            await rt.on_demand.ensure()
        assert await rt.cache.get_profile("p") is None  # a cache-only read misses: no 500, no hang
    return str(failed.value)


# -- the happy paths ------------------------------------------------------------------------------------


async def test_a_rediss_url_carries_the_cache_and_with_connection_through_tls(server, pki, make_config) -> None:
    issued = pki.issue("server", ["DNS:localhost"])
    async with TlsProxy(("127.0.0.1", server.port), cert=issued.cert, key=issued.key) as proxy:
        url = f"rediss://:{server.password}@localhost:{proxy.port}/0?ssl_ca_certs={pki.ca}"
        async with Runtime(make_config(external(url))) as rt:
            await rt.cache.cache_profile("p", {"x": 1})
            assert await rt.cache.get_profile("p") == {"x": 1}
            assert 0 < await rt.on_demand.with_connection(lambda r: r.pttl("ondemand:profile:p")) <= 3_600_000
            status = rt.lifecycle.status()
            assert status["url"] == f"rediss://:***@localhost:{proxy.port}/0"
            assert status["tls"] == {"verify": True, "check_hostname": True, "ca_file": str(pki.ca),
                                     "client_certificate": None, "server_name": None}
        # The probe, the pipelined connection and the redis.asyncio pool: all through TLS (the proxy speaks
        # nothing else), none refused.
        assert proxy.tls_connections >= 3 and proxy.handshake_failures == []
    assert await server.call("GET", "ondemand:profile:p") == b'{"x":1}'


async def test_the_keys_with_a_client_certificate_the_server_requires(server, pki, make_config) -> None:
    issued, client = pki.issue("server", ["IP:127.0.0.1"]), pki.issue("client", (), client=True)
    async with TlsProxy(("127.0.0.1", server.port), cert=issued.cert, key=issued.key, client_ca=pki.ca) as proxy:
        url = f"redis://:{server.password}@127.0.0.1:{proxy.port}/0"
        tls = {"redis_tls": True, "redis_tls_ca_file": str(pki.ca)}
        async with Runtime(make_config(external(url, **tls))) as rt:
            message = await refusal(rt)
        assert message.startswith(f"external Redis at rediss://:***@127.0.0.1:{proxy.port}/0: ")
        assert "TLS: the server requires a client certificate and none is configured" in message

        tls |= {"redis_tls_cert_file": str(client.cert), "redis_tls_key_file": str(client.key)}
        async with Runtime(make_config(external(url, **tls))) as rt:
            await rt.cache.cache_profile("p", [1])
            assert await rt.cache.get_profile("p") == [1]
            assert await rt.on_demand.with_connection(lambda r: r.exists("ondemand:profile:p")) == 1
        # The same as redis-py spells it in a URL.
        url = (f"rediss://:{server.password}@127.0.0.1:{proxy.port}/0?ssl_ca_certs={pki.ca}"
               f"&ssl_certfile={client.cert}&ssl_keyfile={client.key}&ssl_cert_reqs=required")
        async with Runtime(make_config(external(url))) as rt:
            assert await rt.cache.get_profile("p") == [1]


async def test_the_server_name_to_verify_when_the_address_is_not_it(server, pki, make_config) -> None:
    issued = pki.issue("named", ["DNS:redis.internal.example"])
    async with TlsProxy(("127.0.0.1", server.port), cert=issued.cert, key=issued.key) as proxy:
        url = f"rediss://:{server.password}@127.0.0.1:{proxy.port}/0?ssl_ca_certs={pki.ca}"
        async with Runtime(make_config(external(url))) as rt:
            message = await refusal(rt)
        assert "the server's certificate is not valid for the name '127.0.0.1'" in message
        named = external(url, redis_tls_server_name="redis.internal.example")
        async with Runtime(make_config(named)) as rt:
            await rt.cache.cache_profile("p", 1)
            assert await rt.cache.get_profile("p") == 1
            assert await rt.on_demand.with_connection(lambda r: r.get("ondemand:profile:p")) == b"1"


async def test_verification_off_connects_and_is_a_warning(server, stranger, make_config, caplog) -> None:
    issued = stranger.issue("server", ["DNS:elsewhere.example"])
    async with TlsProxy(("127.0.0.1", server.port), cert=issued.cert, key=issued.key) as proxy:
        for lifecycle in ({"redis_url": f"rediss://:{server.password}@127.0.0.1:{proxy.port}/0?ssl_cert_reqs=none"},
                          {"redis_url": f"redis://:{server.password}@127.0.0.1:{proxy.port}/0", "redis_tls": True,
                           "redis_tls_verify": False}):
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="ondemand.redis"):
                async with Runtime(make_config({"lifecycle": {"plugin": "external", **lifecycle}})) as rt:
                    await rt.cache.cache_profile("p", "v")
                    assert await rt.cache.get_profile("p") == "v"
            warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            expected = (f"Redis at rediss://:***@127.0.0.1:{proxy.port}/0: TLS certificate verification is off: "
                        "anyone on the path can pose as the server and read every value and password")
            assert warnings == [expected]
            report = await check(overrides={"lifecycle": {"plugin": "external", **lifecycle}}, environ={})
            assert report.valid and [str(w) for w in report.warnings] == [expected]  # check-config says it too


# -- what is refused, and how it is said --------------------------------------------------------------------


@pytest.mark.parametrize("case", ["unknown CA", "wrong name", "not TLS", "wants TLS"])
async def test_a_failed_handshake_is_one_clear_error_naming_the_endpoint(case, server, pki, stranger,
                                                                         make_config) -> None:
    issued = (stranger if case == "unknown CA" else pki).issue("server", ["DNS:other.example"] if case == "wrong name"
                                                               else ["IP:127.0.0.1"])
    async with TlsProxy(("127.0.0.1", server.port), cert=issued.cert, key=issued.key) as proxy:
        port = server.port if case == "not TLS" else proxy.port
        scheme = "redis" if case == "wants TLS" else "rediss"
        query = "" if case == "wants TLS" else f"?ssl_ca_certs={pki.ca}"
        async with Runtime(make_config(external(f"{scheme}://:{server.password}@127.0.0.1:{port}/0{query}"))) as rt:
            message = await refusal(rt)
            assert rt.on_demand.status()["last_error"] == message
    where = f"external Redis at {scheme}://:***@127.0.0.1:{port}/0"
    expected = {
        "unknown CA": f"{where}: TLS: the server's certificate is not signed by a CA we trust (unable to get local "
                      f"issuer certificate; trusted: the CA bundle {pki.ca})",
        "wrong name": f"{where}: TLS: the server's certificate is not valid for the name '127.0.0.1' (IP address "
                      "mismatch, certificate is not valid for '127.0.0.1'.); set the server name to verify to one it "
                      "carries, or connect by that name",
        # (Redis takes the ClientHello for the start of an inline command and waits: bounded by connect_timeout.)
        "not TLS": f"{where} did not answer within 1 s (a server that speaks no TLS leaves the TLS handshake "
                   "unanswered: is this its TLS port?)",
        "wants TLS": f"{where} closed the connection before it answered (a server that expects TLS does that: use "
                     "rediss://)",
    }[case]
    assert message.startswith(expected), message
    assert server.password not in message


def _tls(**given: tuple[Any, str]) -> TlsOptions:
    return TlsOptions(True, given)


@pytest.mark.parametrize(("url", "message"), [
    ("rediss://h:1/0?ssl_ca_cert=/x", "Redis URL 'rediss://h:1/0?ssl_ca_cert=/x' has unknown query parameter(s) "
                                      "ssl_ca_cert; accepted: "
                                      "db, ssl_ca_certs, ssl_cert_reqs, ssl_certfile, ssl_check_hostname, ssl_keyfile"),
    ("redis://h:1/0?ssl_ca_certs=/x", "Redis URL 'redis://h:1/0?ssl_ca_certs=/x' has unknown query parameter(s) "
                                      "ssl_ca_certs (the ssl_* "
                                      "parameters need a rediss:// URL); accepted: db"),
    ("redis://h:1/0?decode_responses=True&socket_timeout=1", "unknown query parameter(s) decode_responses, "
                                                             "socket_timeout; accepted: db"),
    ("rediss://h:1/0?ssl_cert_reqs=maybe", "ssl_cert_reqs='maybe': expected none, optional or required"),
    ("rediss://h:1/0?ssl_check_hostname=perhaps", "ssl_check_hostname='perhaps': expected true or false"),
    ("redis://h:1/2?db=3", "Redis URL 'redis://h:1/2?db=3' names database 2 in its path and 3 in its query; name it "
                                   "once"),
    ("unix:///tmp/s?ssl_ca_certs=/x", "unknown query parameter(s) ssl_ca_certs (the ssl_* parameters need a "
                                      "rediss:// URL); accepted: db"),
])
def test_a_url_that_says_more_than_we_understand_is_refused(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=r"^lifecycle\.redis_url: ") as refused:
        RedisEndpoint.from_url(url)
    assert message in str(refused.value)


def test_a_url_keeps_db_and_credentials_and_redacts_them() -> None:
    endpoint = RedisEndpoint.from_url("redis://user:p%40ss@h:7?db=3")
    assert (endpoint.host, endpoint.port, endpoint.db, endpoint.username, endpoint.password) == ("h", 7, 3, "user",
                                                                                                "p@ss")
    assert endpoint.describe() == "redis://user:***@h:7/3"
    assert RedisEndpoint.from_url("unix:///run/r.sock?db=2").db == 2


def test_tls_files_are_checked_at_startup(tmp_path: Path, pki) -> None:
    issued = pki.issue("client-only", (), client=True)
    missing = tmp_path / "nope.pem"
    with pytest.raises(ConfigError) as refused:
        _tls(ca_file=(str(missing), "lifecycle.redis_tls_ca_file")).build()
    assert str(refused.value) == (f"lifecycle.redis_tls_ca_file: the CA bundle {missing} (lifecycle.redis_tls_ca_file) "
                                  "cannot be read: No such file or directory")

    shared = tmp_path / "shared.pem"
    shared.write_bytes(pki.ca.read_bytes())
    shared.chmod(0o666)  # anyone could add their CA to what we trust
    with pytest.raises(ConfigError, match=r"is not used: .*shared.pem is writable by group or others \(mode 0666\)"):
        _tls(ca_file=(str(shared), "lifecycle.redis_url (ssl_ca_certs)")).build()

    not_pem = tmp_path / "ca.der"
    not_pem.write_bytes(b"\x30\x82garbage")
    not_pem.chmod(0o600)
    with pytest.raises(ConfigError, match=r"holds no PEM certificate"):
        _tls(ca_file=(str(not_pem), "lifecycle.redis_tls_ca_file")).build()

    with pytest.raises(ConfigError, match="a client key without a client certificate"):
        _tls(key_file=(str(issued.key), "lifecycle.redis_tls_key_file")).build()

    stranger_key = pki.issue("another", (), client=True).key
    with pytest.raises(ConfigError, match=r"the client certificate .* cannot be used: KEY_VALUES_MISMATCH"):
        _tls(cert_file=(str(issued.cert), "lifecycle.redis_tls_cert_file"),
             key_file=(str(stranger_key), "lifecycle.redis_tls_key_file")).build()

    # A key under a passphrase would make OpenSSL prompt on the terminal: refused instead.
    locked = tmp_path / "locked.key"
    subprocess.run(["openssl", "ec", "-in", str(issued.key), "-aes256", "-passout", "pass:secret", "-out", str(locked)],
                   check=True, capture_output=True, timeout=30)
    locked.chmod(0o600)
    with pytest.raises(ConfigError, match=r"cannot be used: .*unencrypted private key"):
        _tls(cert_file=(str(issued.cert), "lifecycle.redis_tls_cert_file"),
             key_file=(str(locked), "lifecycle.redis_tls_key_file")).build()


async def test_a_symlink_to_a_file_is_followed_but_not_one_someone_else_can_swap(tmp_path: Path, pki) -> None:
    # Kubernetes mounts secrets as symlinks into a ..data directory: followed.
    data = tmp_path / "..data"
    data.mkdir(mode=0o755)
    (data / "ca.pem").write_bytes(pki.ca.read_bytes())
    (data / "ca.pem").chmod(0o644)
    (tmp_path / "ca.pem").symlink_to("..data/ca.pem")
    assert _tls(ca_file=(str(tmp_path / "ca.pem"), "lifecycle.redis_tls_ca_file")).build() is not None
    # A directory on the way that others can write: whoever can write it can point the link elsewhere.
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o777)
    open_dir.chmod(0o777)
    (open_dir / "ca.pem").symlink_to(tmp_path / "..data" / "ca.pem")
    with pytest.raises(ConfigError, match=r"open is writable by group or others \(mode 0777, not sticky\)"):
        _tls(ca_file=(str(open_dir / "ca.pem"), "lifecycle.redis_tls_ca_file")).build()


@pytest.mark.parametrize(("lifecycle", "error"), [
    ({"redis_url": "rediss://h:1/0?ssl_ca_certs=/a.pem", "redis_tls_ca_file": "/b.pem"},
     "lifecycle.redis_url: TLS setting 'ca_file' is given twice, differently: by lifecycle.redis_tls_ca_file "
     "and by lifecycle.redis_url (ssl_ca_certs); set it in one place"),
    ({"redis_url": "redis://h:1/0", "redis_tls_ca_file": "/b.pem"},
     "lifecycle.redis_tls_ca_file: TLS settings are given (lifecycle.redis_tls_ca_file) but TLS is off: use a "
     "rediss:// URL or turn TLS on"),
    ({"redis_url": "unix:///run/r.sock", "redis_tls": True},
     "lifecycle.redis_url: TLS is configured, but the Redis URL 'unix:///run/r.sock' is a unix socket (TLS needs "
     "rediss://host:port)"),
    ({"redis_url": "redis://:a@h:1/0", "redis_password": "b"},
     "lifecycle.redis_password: the Redis password is given twice, differently: in lifecycle.redis_url and in "
     "lifecycle.redis_password; give it in one place"),
    ({"redis_url": "redis://h:1/0", "redis_username": "app"},
     "lifecycle.redis_username: an ACL user name without a password: AUTH needs both (give the password in the URL, "
     "lifecycle.redis_password or REDIS_PASSWORD(_FILE))"),
])
async def test_check_config_refuses_tls_and_credential_settings_that_contradict(lifecycle, error) -> None:
    report = await check(overrides={"lifecycle": {"plugin": "external", **lifecycle}}, environ={})
    assert report.error_lines() == [f"configuration error: overrides: {error}"]
