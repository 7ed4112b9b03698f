"""``python -m sut.storage.image ensure``: build a downstairs image if missing, print its tag.

    ensure [--program ours]    our downstairs, phd-downstairs:<hash> (the default)
    ensure --binary PATH        an image around a crucible-downstairs executable

Progress goes to stderr; the tag is the LAST line of stdout so scripts can capture it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from sut.storage.image.build import (
    PROGRAMS,
    ImageBuildError,
    binary_image_tag,
    ensure_binary_image,
    ensure_image,
    image_tag,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sut.storage.image")
    sub = parser.add_subparsers(dest="command", required=True)
    ensure = sub.add_parser("ensure", help="build the image when missing and print its tag")
    ensure.add_argument(
        "--lock-dir",
        type=Path,
        default=None,
        help="directory for the cross-process build lock (default: $TMPDIR)",
    )
    tag = sub.add_parser("tag", help="print the tag the current sources would produce")
    for p in (ensure, tag):
        which = p.add_mutually_exclusive_group()
        which.add_argument(
            "--program",
            choices=PROGRAMS,
            default="ours",
            help="our downstairs (python -m sut.storage.downstairs; the default)",
        )
        which.add_argument(
            "--binary",
            type=Path,
            default=None,
            help="a crucible-downstairs executable to build an image around",
        )
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        if args.command == "tag":
            print(binary_image_tag(args.binary.resolve()) if args.binary else image_tag(args.program))
            return 0
        if args.binary is not None:
            result = ensure_binary_image(args.binary, args.lock_dir)
        else:
            result = ensure_image(args.lock_dir, args.program)
    except ImageBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except FileNotFoundError as exc:
        print(f"error: {exc.filename} not found; install docker and mmdebstrap", file=sys.stderr)
        return 1
    print(f"ensure took {time.monotonic() - started:.1f} s", file=sys.stderr)
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
