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
import re
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


# A JSON string token (escapes included). The checks below run on the text with every string
# replaced by "" so that brackets and digits inside strings do not count. Linear: the
# alternatives cannot match the same character two ways.
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
# The innermost containers: an opening bracket, no bracket, a closing one.
_INNERMOST = re.compile(r"[\[{][^\[\]{}]*[\]}]")
_BRACKET = re.compile(r"[\[\]{}]")


def _long_integer(limit: int) -> re.Pattern[str]:
    # An integer token (not the digits of a fraction or exponent) of more than `limit` digits.
    return re.compile(rf"(?<![0-9.eE+-])-?[0-9]{{{limit + 1},}}(?![0-9.eE])")


# For the fast first looks below: every digit becomes "0", every opening bracket "[", and
# JSON whitespace goes (bytes.translate and `in` run at memory speed; a regex that may start
# at any character does not).
_SHAPE = bytes.maketrans(b"123456789{", b"000000000[")
_JSON_SPACE = b" \t\r\n"


def _check_structure(text: str, limits: JsonLimits) -> None:
    """Depth and integer length, checked on the text before parsing, at the speed of ``re``.

    Checking the parsed value instead walks every item in Python: a 1 MiB array of ``{}``
    took 0.4 s, all of it holding the server's event loop. Here each pass removes the
    innermost containers; a document still holding brackets after ``max_depth`` passes nests
    deeper than the limit (or is not JSON, which the parser would refuse anyway).
    """
    bare = _STRING.sub('""', text)
    # Strings are gone, so what is left is ASCII unless the JSON is invalid anyway.
    shape = bare.encode("utf-8", "surrogatepass").translate(_SHAPE, _JSON_SPACE)
    # A run of digits that long anywhere is rare: only then look for the exact token.
    long_run = b"0" * (limits.max_int_digits + 1) in shape
    match = _long_integer(limits.max_int_digits).search(bare) if long_run else None
    if match is not None:
        digits = len(match.group().lstrip("-"))
        raise JsonLimitError(
            f"an integer of {digits} digits is over the limit of {limits.max_int_digits} digits "
            "(every integer field is at most 64 bits)"
        )
    # The usual deep input opens bracket after bracket: found without a pass.
    if b"[" * (limits.max_depth + 1) in shape:
        raise JsonLimitError(f"nesting deeper than the limit of {limits.max_depth} levels")
    for _ in range(limits.max_depth):
        if _BRACKET.search(bare) is None:
            return
        bare, removed = _INNERMOST.subn("", bare)
        if not removed:
            return  # unbalanced brackets: not JSON, the parser says where
    if _BRACKET.search(bare) is not None and _INNERMOST.search(bare) is not None:
        raise JsonLimitError(f"nesting deeper than the limit of {limits.max_depth} levels")


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JsonLimitError(f"number {text[:40]!r} is out of range (not a finite float)")
    return value


def _reject_constant(name: str) -> Any:
    raise JsonLimitError(f"{name} is not JSON (use a number or null)")


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
    except UnicodeDecodeError as exc:
        raise JsonLimitError(f"not UTF-8: {exc.reason} at byte {exc.start}") from None
    _check_structure(text, limits)
    try:
        # Integers need no hook: _check_structure bounded their length. Floats are rare in
        # our documents, so a hook per float costs nothing.
        return json.loads(text, parse_float=_parse_float, parse_constant=_reject_constant)
    except JsonLimitError:
        raise
    except RecursionError:
        # Only for text that is not JSON (unbalanced brackets pass the structure check).
        raise JsonLimitError(f"nesting deeper than the limit of {limits.max_depth} levels") from None
    except json.JSONDecodeError as exc:
        raise JsonLimitError(f"not valid JSON: {exc}") from None
    except ValueError as exc:  # an integer over sys.int_max_str_digits in malformed text
        raise JsonLimitError(f"not valid JSON: {exc}") from None
