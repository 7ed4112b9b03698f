"""CI entry points. A package so that `python -m ci.regressions`, run from the repository root,
imports the meta test's expectations (`tests.meta`) and `ci.pipeline` without touching sys.path;
the other scripts still run as `python ci/<name>.py`."""
