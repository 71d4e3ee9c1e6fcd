"""Secrets from files: `<key>_file` for every secret key (fields marked SECRET), in TOML and in each of the
loader's layers (`ONDEMAND_<TABLE>__<KEY>_FILE`), and `<VARIABLE>_FILE` for a mapped variable that sets one
(`REDIS_PASSWORD_FILE`, `DATABASE_URL_FILE`): the convention of container images, for orchestrators that
mount secrets as files.

A file is read once, at load; its value replaces the `_file` key, so everything after (validation,
redaction, the workers' resolved config) sees an ordinary secret. Which files are trusted is
`ondemand.host.files.read_provided`'s rule. One trailing line break is part of no secret: stripped.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from ondemand.config.build import Origins
from ondemand.config.sections import SectionRegistry
from ondemand.config.validators import SECRET
from ondemand.errors import ConfigError
from ondemand.host.files import Untrusted, read_provided

SUFFIX = "_file"
_LIMIT = 64 * 1024  # a password, a token, a DSN: far less


@attrs.frozen
class SecretKeys:
    """Which keys of which table are secrets (and may be given as `<key>_file`), and which keys exist."""

    secret: Mapping[str, frozenset[str]]
    declared: Mapping[str, frozenset[str]]

    @classmethod
    def of(cls, sections: SectionRegistry) -> SecretKeys:
        secret: dict[str, set[str]] = {}
        declared: dict[str, set[str]] = {}
        for section in sections.sections:
            for field in attrs.fields(section.cls):
                declared.setdefault(section.table, set()).add(field.name)
                if field.metadata.get(SECRET):
                    secret.setdefault(section.table, set()).add(field.name)
        return cls({t: frozenset(k) for t, k in secret.items()}, {t: frozenset(k) for t, k in declared.items()})

    def file_key(self, table: str, key: str) -> str | None:
        """The secret key that `key` gives as a file (`api_token_file` -> `api_token`), or None."""
        base = key.removesuffix(SUFFIX)
        if base != key and base in self.secret.get(table, ()) and key not in self.declared.get(table, ()):
            return base
        return None

    def variables(self, prefix: str, aliases: Mapping[str, tuple[str, str]]) -> set[str]:
        """Every variable that names a secret file: `ONDEMAND_<TABLE>__<KEY>_FILE` and `<ALIAS>_FILE`."""
        names = {f"{prefix}{table}__{key}{SUFFIX}".upper() for table, keys in self.secret.items() for key in keys}
        return names | {f"{variable}_FILE" for variable, (table, key) in aliases.items()
                        if key in self.secret.get(table, ())}


def read_secret(path: Any, *, source: str | None, key: str) -> str:
    """The secret a file holds (one trailing line break stripped); ConfigError naming the path and why not."""
    if not isinstance(path, str) or not path:
        raise ConfigError(f"expected the path of a file holding the secret, got {type(path).__name__}",
                          source=source, key=key)
    try:
        data = read_provided(path, limit=_LIMIT)
    except Untrusted as exc:
        raise ConfigError(f"the secret file {exc.path} is not used: it {exc.reason}", source=source, key=key) from None
    except OSError as exc:
        raise ConfigError(f"cannot read the secret file {path}: {exc.strerror or exc}", source=source,
                          key=key) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"the secret file {path} is not UTF-8 text", source=source, key=key) from None
    text = text.removesuffix("\n").removesuffix("\r")
    if not text:
        raise ConfigError(f"the secret file {path} is empty", source=source, key=key)
    return text


def label(path: str, named_by: str | None) -> str:
    """Where a value read from a file came from, for errors: the file, and what named it."""
    return f"secret file {path}" + (f" (named by {named_by})" if named_by else "")


def resolve(layer: Mapping[str, Any], keys: SecretKeys, origins: Origins) -> dict[str, Any]:
    """`layer` (the file, the variables, the overrides: each alone, so that a later layer's value wins over
    an earlier one's file and the other way round) with every `<key>_file` read into `<key>`. Both in one
    layer is a ConfigError: which one was meant is not obvious."""
    out = dict(layer)
    for table, values in layer.items():
        if not isinstance(values, Mapping):
            continue  # build_config reports it
        resolved = dict(values)
        for name, path in values.items():
            base = keys.file_key(table, name)
            if base is None:
                continue
            dotted = f"{table}.{name}"
            if base in values:
                raise ConfigError(f"{table}.{base} is given too; give the secret or its file, not both",
                                  source=origins.of(dotted), key=dotted)
            named_by = origins.of(dotted)
            resolved[base] = read_secret(path, source=named_by, key=dotted)
            del resolved[name]
            origins.record({base: resolved[base]}, label(path, named_by), (table,))
        out[table] = resolved
    return out
