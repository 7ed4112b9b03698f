"""Every request the suite stage sent, checked against propolis-server's OpenAPI document.

The suite stage of ci/test runs with ``PHD_REQUEST_LOG`` naming a file: every request of every
test's clients is recorded there (and checked as it is sent, so a violation already failed
its test). This stage reads the whole log afterwards and proves what one test cannot: the run
as a whole exercised the operations a suite run must (:data:`SUITE_OPERATIONS`), and not one
request of it violates the document. It replaces, per PR, a nested run of six suite tests that
tests/meta/test_request_conformance.py makes (that test runs in the nightly).

Usage: python -m ci.conformance LOG [--partial]
  --partial: the suite was narrowed (-k, -m, a shard): violations still fail, a missing
  operation does not.
Without the document (../shared/propolis/ beside the checkout, or PHD_PROPOLIS_OPENAPI) it
passes with a note saying how to provide it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from phd.vm.conformance import HOW_TO, ApiDocument, check_log, find_document

# What a suite run must have sent for "every request conforms" to mean something: creating,
# starting and stopping a VM, watching its state, its serial console, a VCR replacement,
# volume status and a migration's status.
SUITE_OPERATIONS = {"instance_ensure", "instance_state_put", "instance_state_monitor", "instance_serial",
                    "instance_issue_crucible_vcr_request", "disk_volume_status", "instance_migrate_status"}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m ci.conformance", description=__doc__.split("\n")[0])
    parser.add_argument("log", type=Path, help="the JSON lines file PHD_REQUEST_LOG named")
    parser.add_argument("--partial", action="store_true",
                        help="the run was narrowed: only violations fail, not missing operations")
    args = parser.parse_args(argv)
    path = find_document()
    if path is None:
        print(f"conformance: not checked: {HOW_TO}")
        return 0
    document = ApiDocument.load(path)
    if not args.log.is_file():
        print(f"conformance: {args.log} does not exist: the suite stage records its requests there "
              f"(PHD_REQUEST_LOG); run it first (ci/test --stages suite,conformance)")
        return 1
    with args.log.open(errors="replace") as lines:
        found = check_log(document, lines)
    print(f"conformance: {found.requests} requests checked against propolis-server {document.version}: "
          + ", ".join(f"{op} {n}" for op, n in sorted(found.per_operation.items())))
    failed = False
    for title, problems in (("violations of the document", found.violations),
                            ("lines that are not request records", found.unreadable)):
        if problems:
            failed = True
            print(f"conformance: {len(problems)} {title}:")
            for problem in problems[:50]:
                print(f"  {problem}")
    missing = found.missing(SUITE_OPERATIONS)
    if missing and not args.partial:
        failed = True
        print(f"conformance: the suite never sent {', '.join(missing)}: a check of its requests "
              f"that never saw these operations proves nothing about them")
    if not failed:
        print("conformance: every request conforms")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
