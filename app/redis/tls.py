"""TLS to Redis: the settings, the one `ssl.SSLContext` built from them, and errors that say what failed.

Every kind of connection to a Redis endpoint (one-shot RESP, the pipelined connection, redis.asyncio pools
and RedisCluster for `with_connection`, the sentinels) takes its context from the endpoint's `TlsSettings`,
so it is built once per TLS configuration, with its files read and checked at startup. Nodes learned from
a cluster's slot map or a MOVED/ASK share it: they verify their own address unless a server name is set.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from typing import Any

import attrs
import redis.asyncio as aioredis

from ondemand.errors import ConfigError
from ondemand.host.files import Untrusted, read_provided

# The URL query as redis-py spells it (so that a URL a user already has keeps working) -> our setting.
URL_OPTIONS = {
    "ssl_ca_certs": "ca_file",
    "ssl_certfile": "cert_file",
    "ssl_keyfile": "key_file",
    "ssl_cert_reqs": "verify",
    "ssl_check_hostname": "check_hostname",
}
_FILES = {"ca_file": "the CA bundle", "cert_file": "the client certificate", "key_file": "the client key"}
_TRUE, _FALSE = frozenset({"true", "1", "yes", "on"}), frozenset({"false", "0", "no", "off"})


class TlsFailure(ConnectionError):
    """A TLS handshake (or a TLS alert after it) ended the connection: "<where>: <reason>", the reason in
    words (`reason`), for callers that name the endpoint their own way."""

    def __init__(self, where: str, reason: str) -> None:
        self.reason = reason
        super().__init__(f"{where}: {reason}")


@attrs.frozen
class TlsSettings:
    """How to speak TLS to a Redis endpoint. `context` is built once from the rest (`TlsOptions.build`)."""

    context: ssl.SSLContext = attrs.field(eq=False, repr=False)
    ca_file: str | None = None  # None: the system's trusted CAs
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None  # the name the server's certificate must carry; None: the host connected to
    verify: bool = True
    check_hostname: bool = True

    def server_hostname(self, host: str | None) -> str | None:
        """The name sent (SNI) and verified for a connection to `host`."""
        return self.server_name or host

    def status(self) -> dict[str, Any]:
        return {"verify": self.verify, "check_hostname": self.verify and self.check_hostname,
                "ca_file": self.ca_file, "client_certificate": self.cert_file, "server_name": self.server_name}


@attrs.frozen
class TlsOptions:
    """TLS settings as configured, before any file is read: whether TLS is on, and each setting given with
    where it was given (a dotted key, or the URL's query parameter), for errors that name it."""

    enabled: bool = False
    given: Mapping[str, tuple[Any, str]] = attrs.field(factory=dict)

    def merged(self, other: TlsOptions) -> TlsOptions:
        """Both sets of settings; one given twice with different values is a ConfigError naming both places."""
        given = dict(self.given)
        for name, (value, where) in other.given.items():
            if name in given and given[name][0] != value:
                raise ConfigError(f"TLS setting {name!r} is given twice, differently: by {given[name][1]} and by "
                                  f"{where}; set it in one place", key=where.split(" ", 1)[0])
            given[name] = (value, where)
        return TlsOptions(self.enabled or other.enabled, given)

    def build(self) -> TlsSettings | None:
        """The settings with their context, or None when TLS is off. Files are read and checked now (a file we
        cannot trust or read, a key that does not match, is a ConfigError naming it and where it was set)."""
        if not self.enabled:
            if self.given:
                names = ", ".join(sorted(where for _, where in self.given.values()))
                raise ConfigError(f"TLS settings are given ({names}) but TLS is off: use a rediss:// URL or turn "
                                  "TLS on", key=next(iter(self.given.values()))[1].split(" ", 1)[0])
            return None
        values = {name: value for name, (value, _) in self.given.items()}
        if values.get("key_file") and not values.get("cert_file"):
            raise ConfigError("a client key without a client certificate; give both",
                              key=self.given["key_file"][1].split(" ", 1)[0])
        verify, check_hostname = values.get("verify", True), values.get("check_hostname", True)
        context = ssl.create_default_context()
        if values.get("ca_file"):
            context.load_verify_locations(cadata=self._read("ca_file", values["ca_file"]).decode("ascii", "replace"))
        if values.get("cert_file"):
            self._load_chain(context, values["cert_file"], values.get("key_file"))
        context.check_hostname = bool(verify and check_hostname)
        context.verify_mode = ssl.CERT_REQUIRED if verify else ssl.CERT_NONE
        return TlsSettings(context=context, ca_file=values.get("ca_file"), cert_file=values.get("cert_file"),
                           key_file=values.get("key_file"), server_name=values.get("server_name"),
                           verify=verify, check_hostname=check_hostname)

    def _error(self, name: str, path: str, reason: str) -> ConfigError:
        where = self.given[name][1]
        return ConfigError(f"{_FILES[name]} {path} ({where}) {reason}", key=where.split(" ", 1)[0])

    def _read(self, name: str, path: str) -> bytes:
        try:
            data = read_provided(path)
        except Untrusted as exc:
            raise self._error(name, path, f"is not used: {exc}") from None
        except OSError as exc:
            raise self._error(name, path, f"cannot be read: {exc.strerror or exc}") from None
        if name == "ca_file" and b"-----BEGIN CERTIFICATE-----" not in data:
            raise self._error(name, path, "holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
        return data

    def _load_chain(self, context: ssl.SSLContext, cert_file: str, key_file: str | None) -> None:
        for name, path in (("cert_file", cert_file), ("key_file", key_file)):
            if path is not None:
                self._read(name, path)  # checked as any file we are given (load_cert_chain reads the path itself)

        def no_passphrase() -> bytes:
            # Without this OpenSSL would prompt on the terminal for an encrypted key: a startup that hangs.
            raise ValueError("encrypted keys are not supported")

        try:
            context.load_cert_chain(cert_file, key_file, password=no_passphrase)
        except (ssl.SSLError, ValueError) as exc:
            where = f"{self.given['cert_file'][1]}" + (f", {self.given['key_file'][1]}" if key_file else "")
            raise ConfigError(f"the client certificate {cert_file}{' and key ' + key_file if key_file else ''} "
                              f"({where}) cannot be used: {getattr(exc, 'reason', None) or exc} (a PEM certificate "
                              "and its unencrypted private key are expected)",
                              key=self.given["cert_file"][1].split(" ", 1)[0]) from None


def url_options(query: Mapping[str, str], where: str) -> TlsOptions:
    """The TLS settings of a rediss:// URL's query (redis-py's names); a bad value is a ConfigError."""
    given: dict[str, tuple[Any, str]] = {}
    for param, text in query.items():
        name = URL_OPTIONS[param]
        value: Any = text
        if name == "verify":
            if text.lower() not in ("none", "optional", "required"):
                raise ConfigError(f"ssl_cert_reqs={text!r}: expected none, optional or required", key=where)
            value = text.lower() != "none"  # (a client treats optional as required)
        elif name == "check_hostname":
            if text.lower() not in _TRUE | _FALSE:
                raise ConfigError(f"ssl_check_hostname={text!r}: expected true or false", key=where)
            value = text.lower() in _TRUE
        elif not text:
            raise ConfigError(f"{param} is empty: expected a file path", key=where)
        given[name] = (value, f"{where} ({param})")
    return TlsOptions(True, given)


def reason(exc: BaseException, tls: TlsSettings | None = None, host: str | None = None) -> str:
    """Why a TLS connection failed, in words: what the user must change, with OpenSSL's own words after."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        code, detail = exc.verify_code, exc.verify_message or str(exc)
        name = tls.server_hostname(host) if tls is not None else host
        if code in (62, 64):  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
            return (f"TLS: the server's certificate is not valid for the name {name!r} ({detail}); set the "
                    "server name to verify to one it carries, or connect by that name")
        if code in (2, 18, 19, 20, 21):  # no issuer, self-signed, self-signed in chain, no local issuer, leaf
            ca = f"the CA bundle {tls.ca_file}" if tls is not None and tls.ca_file else "the system's CAs"
            return f"TLS: the server's certificate is not signed by a CA we trust ({detail}; trusted: {ca})"
        if code == 10:
            return f"TLS: the server's certificate has expired ({detail})"
        if code == 9:
            return f"TLS: the server's certificate is not valid yet ({detail})"
        return f"TLS: the server's certificate does not verify ({detail})"
    if isinstance(exc, ssl.SSLError):
        code = str(exc.reason or "")
        if code in ("TLSV13_ALERT_CERTIFICATE_REQUIRED", "SSLV3_ALERT_HANDSHAKE_FAILURE") and not (
                tls is not None and tls.cert_file):
            return f"TLS: the server requires a client certificate and none is configured ({code})"
        if code in ("TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE", "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
                    "TLSV1_ALERT_DECRYPT_ERROR", "TLSV13_ALERT_CERTIFICATE_REQUIRED"):
            return f"TLS: the server refused our client certificate ({code})"
        if code in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST"):
            return f"TLS: the server does not speak TLS on this port ({code}); use a redis:// URL or its TLS port"
        return f"TLS: {exc.reason or exc}"
    return str(exc)


def failure(exc: ssl.SSLError, where: str, tls: TlsSettings | None = None, host: str | None = None) -> TlsFailure:
    return TlsFailure(where, reason(exc, tls, host))


class TlsConnection(aioredis.SSLConnection):
    """A redis.asyncio connection that speaks TLS with our context (redis-py would build one per connection
    from file names, and cannot verify a server name other than the host). The pool or cluster client passes
    `tls` with the other connection arguments."""

    def __init__(self, *, tls: TlsSettings, **kwargs: Any) -> None:
        self.tls = tls
        super().__init__(**kwargs)

    def _connection_arguments(self) -> Mapping[str, Any]:
        return {"host": self.host, "port": self.port, "ssl": self.tls.context,
                "server_hostname": self.tls.server_hostname(self.host)}

    async def _connect(self) -> None:
        try:
            await super()._connect()
        except ssl.SSLError as exc:
            raise failure(exc, f"Redis at {self.host}:{self.port}", self.tls, self.host) from None


def warn_unverified(tls: TlsSettings | None) -> str | None:
    """The warning a configuration that does not verify the server deserves (None when it does)."""
    if tls is None:
        return None
    if not tls.verify:
        return ("TLS certificate verification is off: anyone on the path can pose as the server and read "
                "every value and password")
    if not tls.check_hostname:
        return ("TLS server name checking is off: any certificate our CAs signed is accepted, for any server")
    return None
