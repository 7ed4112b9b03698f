"""``python -m sut.storage.image ensure``: build the downstairs image if missing, print its tag.

Progress goes to stderr; the tag is the LAST line of stdout so scripts can capture it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from sut.storage.image.build import ImageBuildError, ensure_image, image_tag


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
    sub.add_parser("tag", help="print the tag the current sources would produce")
    args = parser.parse_args(argv)
    if args.command == "tag":
        print(image_tag())
        return 0
    started = time.monotonic()
    try:
        tag = ensure_image(args.lock_dir)
    except ImageBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except FileNotFoundError as exc:
        print(f"error: {exc.filename} not found; install docker and mmdebstrap", file=sys.stderr)
        return 1
    print(f"ensure took {time.monotonic() - started:.1f} s", file=sys.stderr)
    print(tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
