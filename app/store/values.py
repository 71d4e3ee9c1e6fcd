"""The rules for what crosses our API: ids, ttls, and JSON values stored unchanged.

- An id is a non-empty string of at most 256 UTF-8 bytes without control characters.
- A ttl is a number of seconds greater than 0 and at most ten years.
- A value is JSON, stored as orjson writes it; integers must fit in 64 bits (from -2**63 to 2**64-1,
  what orjson carries exactly) and floats must be finite. A value that would change on the way
  through (a larger integer read back as a float, NaN written as null) is refused with InvalidInput.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import orjson

from ondemand.errors import InvalidInput

MIN_INT, MAX_INT = -(2**63), 2**64 - 1
INTEGER_RULE = (f"integers must be from {MIN_INT} to {MAX_INT} (64 bits); a larger one would not be stored "
                "exactly (send it as a string)")
_LONG_DIGITS = re.compile(rb"\d{19}")
MAX_ID_BYTES = 256
MAX_TTL = 10 * 365 * 24 * 3600.0
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
CORRUPT = object()  # what decode gives for stored bytes that are not JSON


def check_id(item_id: Any) -> str:
    """An id must be a non-empty string of at most 256 UTF-8 bytes with no control characters."""
    # The common case in three C calls: for ASCII text, isprintable() is exactly "no control characters".
    if type(item_id) is str and item_id.isascii() and item_id.isprintable() and 0 < len(item_id) <= MAX_ID_BYTES:
        return item_id
    if type(item_id) is not str:
        raise InvalidInput(f"id must be a string, got {type(item_id).__name__}")
    if not item_id:
        raise InvalidInput("id must not be empty")
    if item_id.isascii():  # the common case: one byte per character, nothing to encode
        size = len(item_id)
    else:
        try:
            size = len(item_id.encode())
        except UnicodeEncodeError:  # lone surrogates have no UTF-8 form
            raise InvalidInput("id must be valid Unicode text (no lone surrogates)") from None
    if size > MAX_ID_BYTES:
        raise InvalidInput(f"id must be at most {MAX_ID_BYTES} bytes in UTF-8, got {size}")
    if _CONTROL.search(item_id):
        raise InvalidInput("id must not contain control characters")
    return item_id


def check_ttl(ttl: Any, default: float | None) -> float | None:
    """ttl in seconds: a number greater than 0 and at most ten years; None means the namespace default."""
    if ttl is None:
        return default
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or ttl != ttl:
        raise InvalidInput(f"ttl must be a number of seconds, got {ttl!r}")
    if not 0 < ttl <= MAX_TTL:
        raise InvalidInput(f"ttl must be greater than 0 and at most {MAX_TTL:.0f} seconds, got {ttl!r}")
    return float(ttl)


def encode(value: Any) -> bytes:
    """A value as stored: JSON (orjson). Nothing is changed on the way: an integer JSON cannot carry
    exactly (beyond 64 bits) and NaN or infinity (which orjson would write as null) are refused."""
    try:
        raw = orjson.dumps(value)
    except TypeError as exc:
        if "64-bit" in str(exc):
            raise InvalidInput(INTEGER_RULE) from None
        raise InvalidInput(f"value must be JSON-serializable: {exc}") from None
    if b"null" in raw and _has_non_finite(value):  # the common case pays one substring search
        raise InvalidInput("value must not contain NaN or infinity: JSON has no such numbers")
    return raw


def decode(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return CORRUPT


def _has_non_finite(value: Any) -> bool:
    stack = [value]
    while stack:
        node = stack.pop()
        if type(node) is float and not math.isfinite(node):
            return True
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list | tuple):
            stack.extend(node)
    return False


def _checked_int(text: str) -> int:
    value = int(text)
    if not MIN_INT <= value <= MAX_INT:
        raise ValueError(text)
    return value


def parse_json(body: bytes) -> Any:
    """A request body as JSON, refusing integers that orjson would silently turn into floats.

    orjson reads integers from -2**63 to 2**64-1 exactly and anything larger as a float; a body with
    no run of 19 or more digits cannot hold such an integer, and only one that has pays for a second,
    exact parse (the standard library's) that checks every integer literal, strings excluded."""
    value = orjson.loads(body)
    if _LONG_DIGITS.search(body) is not None:
        try:
            json.loads(body, parse_int=_checked_int)
        except json.JSONDecodeError:
            pass  # orjson, the stricter parser, already accepted it; only the integers matter here
        except ValueError:
            raise InvalidInput(INTEGER_RULE) from None
    return value


