"""The rules for what crosses our API: ids, ttls, and JSON values stored unchanged.

- An id is a non-empty string of at most 256 UTF-8 bytes without control characters.
- A ttl is a number of seconds from 0.001 (Redis's resolution: anything shorter is gone on arrival) to ten
  years.
- A value is JSON, stored as orjson writes it, and must read back equal (==) to what was given. In Python
  it is built from dict (str keys), list, str, int, float, bool and None (or subclasses of these, which read
  back equal as their base type: an IntEnum, an OrderedDict). What the encoder would change (a tuple into a
  list, a datetime or a UUID into text, an Enum into its value, NaN into null) or cannot encode (bytes, a
  set, a non-str key) is refused, naming the type and where it is. A whole number must fit in 64 bits (from
  -2**63 to 2**64-1, what orjson carries exactly as an integer), whether an int or a float (1e20 is one:
  JSON and its schemas know numbers, not Python's types, so the rule is about the value).
- A request body's numbers must read back as the decimals that were sent: an integer beyond 64 bits, or a
  decimal a 64-bit float cannot hold (more significant digits than it keeps, or out of its range) is
  refused with InvalidInput naming the rule, never rounded.
"""

from __future__ import annotations

import enum
import json
import math
import re
from decimal import Decimal
from typing import Any

import orjson

from ondemand.errors import InvalidInput

MIN_INT, MAX_INT = -(2**63), 2**64 - 1
INTEGER_RULE = (f"whole numbers must be from {MIN_INT} to {MAX_INT} (64 bits), however they are written (1, "
                "1.0, 1e3): a larger integer would not be stored exactly; send it as a string")
DECIMAL_RULE = ("a number with a fraction or an exponent must read back as the decimal that was sent: a 64-bit "
                "float keeps 15 significant digits exactly, 16 or 17 only when they are its own shortest form (as "
                "JavaScript and Python print it), from about 1e-308 to 1.8e308 in size; send other decimals as "
                "strings")
# A number that orjson might not read exactly: a run of 19 digits (an integer beyond 64 bits has 20; every
# such run is found, 19 is the shortest that can hold one past 2**63), or a digit right before '.', 'e' or 'E'
# (every JSON number with a fraction or an exponent has one). One scan finds either; text in strings can
# match too, which only costs the exact check, never a miss.
_NUMBER_TO_CHECK = re.compile(rb"\d(?:[.eE]|\d{18})")
MAX_ID_BYTES = 256
MIN_TTL = 0.001
MAX_TTL = 10 * 365 * 24 * 3600.0
TTL_RULE = f"ttl must be a number of seconds from {MIN_TTL:g} to {MAX_TTL:.0f} (ten years)"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
CORRUPT = object()  # what decode gives for stored bytes that are not JSON

# The encoder hands these to `default` (None here: a TypeError) instead of converting them: datetimes to
# ISO text, dataclasses to objects.
_STRICT = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS
_PLAIN = (dict, list, str, int, float)  # bool is an int; None is checked apart
PLAIN_TYPES = "dict (str keys), list, str, int, float, bool or None"


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
    """ttl in seconds: a number from MIN_TTL to ten years; None means the namespace default."""
    if ttl is None:
        return default
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or ttl != ttl:
        raise InvalidInput(f"ttl must be a number of seconds, got {ttl!r}")
    if not MIN_TTL <= ttl <= MAX_TTL:
        raise InvalidInput(f"{TTL_RULE}, got {ttl!r}")
    return float(ttl)


def encode(value: Any) -> bytes:
    """A value as stored: JSON (orjson) that reads back equal to `value`. Anything the encoder would convert
    (a tuple, a datetime, a UUID, an Enum, a subclass, NaN written as null) or refuse is InvalidInput."""
    try:
        raw = orjson.dumps(value, option=_STRICT)
    except TypeError as exc:
        if "64-bit" in str(exc):
            raise InvalidInput(INTEGER_RULE) from None
        raise InvalidInput(_not_plain(value) or f"value must be JSON-serializable: {exc}") from None
    kind = type(value)
    # A str, int, bool or None reads back as itself. Anything else is read back, one more C pass: the exact
    # test of "nothing converted" (a tuple reads back as a list, a UUID as a str, NaN as None: none is equal).
    if kind is not str and kind is not int and kind is not bool and value is not None \
            and orjson.loads(raw) != value:
        raise InvalidInput(_not_plain(value) or "value would not read back equal to what was given")
    # orjson writes a float of 1e16 or more with "e+": only then can one be a whole number beyond 64 bits.
    if b"e+" in raw and (problem := _not_plain(value)):
        raise InvalidInput(problem)
    return raw


def _not_plain(value: Any) -> str | None:
    """What in `value` JSON cannot carry unchanged, and where (`$.a[2]`), or None."""
    stack: list[tuple[Any, str]] = [(value, "$")]
    while stack:
        node, where = stack.pop()
        if node is None:
            continue
        kind = type(node)
        if not isinstance(node, _PLAIN) or (isinstance(node, enum.Enum) and not isinstance(node, int | str)):
            name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
            return f"value must be built from {PLAIN_TYPES}; {where} is a {name}"
        if isinstance(node, float):
            if not math.isfinite(node):
                return f"value must not contain NaN or infinity (JSON has no such numbers): {where} is {node!r}"
            if node.is_integer() and not MIN_INT <= node <= MAX_INT:
                return f"{INTEGER_RULE}; {where} is {node!r}"
        if isinstance(node, dict):
            for key, child in node.items():
                if not isinstance(key, str):
                    return f"object keys must be str; {where} has the key {key!r} ({type(key).__name__})"
                stack.append((child, f"{where}.{key}"))
        elif isinstance(node, list):
            stack.extend((child, f"{where}[{i}]") for i, child in enumerate(node))
    return None


def decode(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return CORRUPT


def _checked_int(text: str) -> int:
    value = int(text)
    if not MIN_INT <= value <= MAX_INT:
        raise InvalidInput(INTEGER_RULE)
    return value


def _checked_float(text: str) -> float:
    value = float(text)
    if value.is_integer() and not MIN_INT <= value <= MAX_INT:  # 1e20: a whole number, as 100000000000000000000
        raise InvalidInput(INTEGER_RULE)
    # The usual case: the sender wrote the shortest form (JavaScript, Python, orjson all do), which is what
    # orjson writes back. Otherwise compare the decimal values exactly ("1E2" is 100.0, "0.10" is 0.1).
    if repr(value) != text and (not math.isfinite(value) or Decimal(text) != Decimal(repr(value))):
        shown = text if len(text) <= 40 else f"{text[:37]}..."
        raise InvalidInput(f"{DECIMAL_RULE}; got {shown}")
    return value


def parse_json(body: bytes) -> Any:
    """A request body as JSON, refusing numbers that orjson would silently change.

    orjson reads integers from -2**63 to 2**64-1 exactly and anything larger as a float, and rounds every
    decimal to the nearest 64-bit float. Only a body with a run of 19 or more digits (a possible large
    integer) or a digit before '.', 'e' or 'E' (a possible decimal) pays for a second, exact parse (the
    standard library's) that checks each number literal; strings are never mistaken for numbers there."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        if _NUMBER_TO_CHECK.search(body) is not None:  # "number is infinity": name our rule, not the parser's
            _check_numbers(body)
        raise
    if _NUMBER_TO_CHECK.search(body) is not None:
        _check_numbers(body)
    return value


# Built once, as a compiled regex is: json.loads with hooks would build a decoder per call (a third of the cost).
_EXACT_NUMBERS = json.JSONDecoder(parse_int=_checked_int, parse_float=_checked_float)


def _check_numbers(body: bytes) -> None:
    try:
        _EXACT_NUMBERS.decode(body.decode())
    except InvalidInput:  # a number refused by _checked_int or _checked_float
        raise
    except (ValueError, RecursionError):  # bad syntax or UTF-8: orjson, the stricter parser, judges those
        pass
