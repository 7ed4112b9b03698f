"""The one JSON parser for input from outside: bounded size, depth, integer length and floats.

Every JSON that crosses into the reference system from a client goes through :func:`loads`:
HTTP bodies, VCRs (also when nested as a string inside a body) and the downstairs' message
headers. ``json.loads`` alone has four ways to hurt a server: a body of any size is parsed
whole (memory, and seconds of a blocked event loop), deep nesting raises RecursionError (a
500 or a dropped connection instead of an answer), an integer of thousands of digits costs
quadratic time or raises a bare ValueError, and ``1e999``/``NaN`` become floats that no
field of ours accepts but that break JSON answers echoed back. Each limit is checked here and
named in the error, so the caller can answer 400 (or a protocol error) with the reason.

Stdlib only: the downstairs container image imports this module.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

__all__ = ["DEFAULT_LIMITS", "JsonLimitError", "JsonLimits", "loads"]


class JsonLimitError(ValueError):
    """The input is not JSON, or breaks one of the limits; the message names which."""


@dataclass(frozen=True)
class JsonLimits:
    # 1 MiB is far above any real request of ours (a VCR is a few hundred bytes, an instance
    # spec a few KiB) and far below what would hurt a server.
    max_bytes: int = 1024 * 1024
    # Our deepest real document (a VCR with a read-only parent inside a request body) nests
    # about 8 levels; 32 leaves room without letting a client recurse the parser.
    max_depth: int = 32
    # Every integer of the interfaces is at most a u64 or an i64: 20 digits and a sign.
    max_int_digits: int = 20


DEFAULT_LIMITS = JsonLimits()


def _parse_int(text: str, limit: int) -> int:
    digits = len(text) - (text[0] == "-")
    if digits > limit:
        raise JsonLimitError(
            f"an integer of {digits} digits is over the limit of {limit} digits "
            "(every integer field is at most 64 bits)"
        )
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JsonLimitError(f"number {text[:40]!r} is out of range (not a finite float)")
    return value


def _reject_constant(name: str) -> Any:
    raise JsonLimitError(f"{name} is not JSON (use a number or null)")


def _check_depth(value: object, limit: int) -> None:
    # Iterative: the point is not to recurse on input the client controls.
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            raise JsonLimitError(f"nesting deeper than the limit of {limit} levels")
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))


def loads(data: str | bytes | bytearray, limits: JsonLimits = DEFAULT_LIMITS) -> Any:
    """Parse ``data`` as JSON within ``limits``; raises :class:`JsonLimitError` naming the problem."""
    # A str has at least as many UTF-8 bytes as characters: only a short one is encoded to count.
    size = len(data)
    if isinstance(data, str) and size <= limits.max_bytes and not data.isascii():
        size = len(data.encode("utf-8", "surrogatepass"))
    if size > limits.max_bytes:
        raise JsonLimitError(f"{size} bytes is over the limit of {limits.max_bytes} bytes")
    try:
        # JSON between systems is UTF-8 (RFC 8259); json.loads would also guess UTF-16/32.
        text = data if isinstance(data, str) else bytes(data).decode("utf-8")
        value = json.loads(
            text,
            parse_int=lambda text: _parse_int(text, limits.max_int_digits),
            parse_float=_parse_float,
            parse_constant=_reject_constant,
        )
    except JsonLimitError:
        raise
    except RecursionError:
        # The C scanner recurses once per level; it gives up long before our stack does.
        raise JsonLimitError(f"nesting deeper than the limit of {limits.max_depth} levels") from None
    except json.JSONDecodeError as exc:
        raise JsonLimitError(f"not valid JSON: {exc}") from None
    except UnicodeDecodeError as exc:
        raise JsonLimitError(f"not UTF-8: {exc.reason} at byte {exc.start}") from None
    _check_depth(value, limits.max_depth)
    return value
