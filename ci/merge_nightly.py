"""Merge the results/nightly.json of several shards (ci/nightly --shard i/N) into one.

Usage: python ci/merge_nightly.py [-o results/nightly.json] INPUT...

An INPUT is a shard's nightly.json, or a folder: every nightly.json under it counts (what
actions/download-artifact leaves: one folder per shard's artifact). The result is the union of
the test ids; a test found in more than one input gets its passed, failed, skipped and runs
summed, and pass_rate is recomputed as ci/nightly computes it: passed / (passed + failed),
rounded to 3 places, null when the test never ran (only skips).

Everything read is checked before anything is written; a missing file, a folder with no
nightly.json, malformed JSON, a test id twice in one file, a count that is not a whole number
>= 0, or runs != passed + failed + skipped is an error naming the file (exit 2), and the output
is not written. Standard library only: it runs before or without the venv.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

COUNTS = ("passed", "failed", "skipped", "runs")
NAME = "nightly.json"


class MergeError(Exception):
    """An input that cannot be merged; the message names the file."""


def _no_duplicates(path: Path) -> Any:
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:
                raise MergeError(f"{path}: key {key!r} appears twice in one object")
            seen[key] = value
        return seen

    return hook


def _constant(path: Path) -> Any:
    def reject(name: str) -> Any:
        raise MergeError(f"{path}: {name} is not valid JSON")

    return reject


def load(path: Path) -> dict[str, dict[str, int]]:
    """One shard's table, checked: {test id: {passed, failed, skipped, runs}} (pass_rate, and
    any other key of a row, is dropped: it is recomputed after the merge)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MergeError(f"{path}: no such file (did that shard write its {NAME}?)") from None
    except IsADirectoryError:
        raise MergeError(f"{path}: is a folder, not a {NAME}") from None
    except UnicodeDecodeError as exc:
        raise MergeError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise MergeError(f"{path}: cannot read it ({exc.strerror})") from None
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates(path),
                          parse_constant=_constant(path))
    except json.JSONDecodeError as exc:
        raise MergeError(f"{path}: malformed JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
                         ) from None
    if not isinstance(data, dict):
        raise MergeError(f"{path}: expected an object {{test id: counts}}, got {type(data).__name__}")
    table: dict[str, dict[str, int]] = {}
    for test, row in data.items():
        if not test:
            raise MergeError(f"{path}: an empty test id")
        if not isinstance(row, dict):
            raise MergeError(f"{path}: {test}: expected an object of counts, got {type(row).__name__}")
        counts: dict[str, int] = {}
        for key in COUNTS:
            value = row.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise MergeError(f"{path}: {test}: {key} must be a whole number >= 0, got {value!r}")
            counts[key] = value
        if counts["runs"] != counts["passed"] + counts["failed"] + counts["skipped"]:
            raise MergeError(f"{path}: {test}: runs ({counts['runs']}) != passed + failed + skipped "
                             f"({counts['passed']} + {counts['failed']} + {counts['skipped']})")
        table[test] = counts
    return table


def inputs(args: list[Path], output: Path | None = None) -> list[Path]:
    """The files behind the arguments: a file as given, a folder's nightly.json files (sorted),
    less ``output`` (a merge into a folder it reads must not count last run's merge)."""
    if not args:
        raise MergeError(f"no input: name the shards' {NAME} files or folders holding them")
    files: list[Path] = []
    for arg in args:
        if arg.is_dir():
            found = [f for f in sorted(arg.rglob(NAME))
                     if output is None or f.resolve() != output.resolve()]
            if not found:
                raise MergeError(f"{arg}: no {NAME} under this folder (did that shard fail before "
                                 "writing it, or was its artifact not uploaded?)")
            files += found
        else:
            files.append(arg)  # a missing file is reported by load(), by name
    return files


def merge(tables: list[dict[str, dict[str, int]]]) -> dict[str, dict[str, Any]]:
    merged: dict[str, dict[str, Any]] = {}
    for table in tables:
        for test, counts in table.items():
            row = merged.setdefault(test, dict.fromkeys(COUNTS, 0))
            for key in COUNTS:
                row[key] += counts[key]
    for row in merged.values():
        ran = row["passed"] + row["failed"]
        row["pass_rate"] = round(row["passed"] / ran, 3) if ran else None
    return dict(sorted(merged.items()))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ci/merge_nightly.py", description=__doc__.split("\n")[0])
    parser.add_argument("inputs", nargs="*", type=Path, metavar="INPUT",
                        help=f"a shard's {NAME}, or a folder searched for {NAME} files")
    parser.add_argument("-o", "--output", type=Path, default=Path("results") / NAME,
                        help=f"where the merged table goes (default results/{NAME})")
    args = parser.parse_args(argv)
    try:
        files = inputs(args.inputs, args.output)
        tables = [load(f) for f in files]
    except MergeError as exc:
        print(f"merge_nightly: error: {exc}", file=sys.stderr)
        return 2
    merged = merge(tables)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(merged, indent=2) + "\n")
    ran = sum(1 for r in merged.values() if r["pass_rate"] is not None)
    print(f"merged {len(files)} file(s), {len(merged)} tests ({ran} ran) -> {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
