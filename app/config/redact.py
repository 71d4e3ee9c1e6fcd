"""Secrets out of what we show: check-config, status, logs."""

from __future__ import annotations

import re
from typing import Any

import attrs

from ondemand.config.build import sections_of, unstructure
from ondemand.config.sections import Config
from ondemand.config.validators import SECRET


def redact_url(url: str) -> str:
    """`scheme://user:secret@host/db` -> `scheme://user:***@host/db`; also hides `password=` and
    `sslpassword=` (a client key's passphrase) params."""
    # The last '@' before the path ends the credentials, as urlsplit reads it.
    url = re.sub(r"(://[^:/@?#]*:)[^/?#]*@", r"\1***@", url)
    # libpq key=value DSNs allow spaces around '=' and quoted values with spaces.
    return re.sub(r"(?i)(\b(?:ssl)?password\s*=\s*)('(?:[^'\\]|\\.)*'|[^&\s]*)", r"\1***", url)


def redact(config: Config) -> dict[str, Any]:
    """The config as plain data with every secret replaced (fields marked with SECRET), for status
    output and check-config."""
    data = unstructure(config)
    for table, value in sections_of(config):
        for field in attrs.fields(type(value)):
            kind = field.metadata.get(SECRET)
            current = data[table].get(field.name)
            if kind is None or current is None:
                continue
            data[table][field.name] = redact_url(current) if kind == "url" else "***"
    return data
