"""`phd` command line: housekeeping that is useful outside a pytest run."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="phd", description="PHD framework housekeeping")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("sweep", help="remove containers and volumes left behind by killed phd runs")
    args = parser.parse_args(argv)
    if args.cmd == "sweep":
        import docker

        from phd.downstairs import sweep_leftovers

        removed = sweep_leftovers(docker.from_env(), keep_session="")
        print("\n".join(removed) if removed else "nothing to sweep")
    return 0


if __name__ == "__main__":
    sys.exit(main())
