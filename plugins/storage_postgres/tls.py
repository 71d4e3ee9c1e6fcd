"""TLS to an external PostgreSQL: libpq does it (`sslmode`, `sslrootcert`, `sslcert`, `sslkey`, `sslcrl` in the
DSN reach every connection); what we add is checking at startup what libpq would meet only at the first
connection, with the same file rules as every file we are given (ondemand.host.files.read_provided)."""

from __future__ import annotations

from collections.abc import Mapping

from ondemand.errors import ConfigError
from ondemand.host.files import Untrusted, read_provided

SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_FILES = {"sslrootcert": "the CA bundle", "sslcert": "the client certificate", "sslkey": "the client key",
          "sslcrl": "the certificate revocation list"}


def check_tls(params: Mapping[str, str]) -> None:
    """ConfigError (key postgres.dsn) for an sslmode libpq does not know, or a TLS file that is missing or
    that we do not trust."""
    mode = params.get("sslmode")
    if mode is not None and mode not in SSLMODES:
        raise ConfigError(f"sslmode={mode!r} is not one of libpq's: {', '.join(SSLMODES)} (verify-full checks the "
                          "server's certificate and name)", key="postgres.dsn")
    for name, what in _FILES.items():
        path = params.get(name)
        if not path or (name == "sslrootcert" and path == "system"):  # libpq 16+: the system's CAs
            continue
        try:
            read_provided(path)
        except Untrusted as exc:
            raise ConfigError(f"{name}={path}: {what} is not used: {exc}", key="postgres.dsn") from None
        except OSError as exc:
            raise ConfigError(f"{name}={path}: {what} cannot be read: {exc.strerror or exc}",
                              key="postgres.dsn") from None
