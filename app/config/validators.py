"""Validators for config fields, the core's and plugins' alike: each names the field and what was expected."""

from __future__ import annotations

import math
import re
from typing import Any

import attrs

_MAX_SECONDS_OR_COUNT = 10 * 365 * 24 * 3600
_SIZE = re.compile(r"^\d+(b|kb|mb|gb)?$", re.IGNORECASE)

# attrs metadata key marking a secret field: "token" hides the whole value, "url" the credentials in it.
SECRET = "ondemand.secret"


class FieldError(ValueError):
    """A validator's complaint about one field; the loader adds the field to the dotted key."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(message)


def positive(_inst: Any, attribute: attrs.Attribute, value: float | None) -> None:
    """A finite number greater than 0, at most ten years (seconds) or as many units (None passes)."""
    # inf passes `> 0` but overflows every int(seconds * 1000) downstream; nan fails every comparison.
    if value is not None and not (value > 0 and math.isfinite(value) and value <= _MAX_SECONDS_OR_COUNT):
        raise FieldError(attribute.name, f"expected a finite number greater than 0 (at most ten years), got {value!r}")


def between(low: int, high: int) -> Any:
    """An integer from `low` to `high`."""
    def check(_inst: Any, attribute: attrs.Attribute, value: int) -> None:
        if not low <= value <= high:
            raise FieldError(attribute.name, f"expected an integer from {low} to {high}, got {value!r}")

    return check


def seconds_between(low: float, high: float) -> Any:
    """A finite number of seconds from `low` to `high`."""
    def check(_inst: Any, attribute: attrs.Attribute, value: float) -> None:
        if not (math.isfinite(value) and low <= value <= high):
            raise FieldError(attribute.name, f"expected a number of seconds from {low:g} to {high:g}, got {value!r}")

    return check


def matches(pattern: str, meaning: str) -> Any:
    """A string matching `pattern` whole; `meaning` says in words what that is."""
    compiled = re.compile(pattern)

    def check(_inst: Any, attribute: attrs.Attribute, value: str) -> None:
        if not compiled.fullmatch(value):
            raise FieldError(attribute.name, f"expected {meaning}, got {value!r}")

    return check


def token(_inst: Any, attribute: attrs.Attribute, value: str | None) -> None:
    if value is not None and not re.fullmatch(r"[\x21-\x7e]+", value):
        raise FieldError(attribute.name, "expected a non-empty token of printable ASCII without spaces")


_ORIGIN = re.compile(r"https?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:\d{1,5})?")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP token (RFC 9110): a method or header name


def origins(_inst: Any, attribute: attrs.Attribute, value: tuple[str, ...]) -> None:
    """CORS origins: "*", or each `scheme://host[:port]` as a browser sends it (no path, no slash)."""
    if value == ("*",):
        return
    for origin in value:
        if not _ORIGIN.fullmatch(origin):
            raise FieldError(attribute.name, 'expected ["*"] or origins such as "https://app.example.com" or '
                                             f'"http://localhost:3000" (scheme, host, port; no path), got {origin!r}')


def http_tokens(_inst: Any, attribute: attrs.Attribute, value: tuple[str, ...]) -> None:
    """HTTP methods or header names: tokens, no spaces or commas."""
    for item in value:
        if not _TOKEN.fullmatch(item):
            raise FieldError(attribute.name, f"expected HTTP methods or header names (tokens), got {item!r}")


def ttl_seconds(_inst: Any, attribute: attrs.Attribute, value: float | None) -> None:
    """A ttl: from 0.001 seconds (Redis's resolution) to ten years (None passes: no expiry)."""
    if value is not None and not (math.isfinite(value) and 0.001 <= value <= _MAX_SECONDS_OR_COUNT):
        raise FieldError(attribute.name, f"expected a number of seconds from 0.001 to ten years, got {value!r}")


def memory_size(_inst: Any, attribute: attrs.Attribute, value: str) -> None:
    """A Redis memory size: digits with an optional b, kb, mb or gb."""
    if not _SIZE.match(value):
        raise FieldError(attribute.name, f"expected a size like '256mb' or '0' (no limit), got {value!r}")

