"""Crucible-style reference storage: VCRs, downstairs, upstairs, and an NBD export.

This package init imports nothing: the downstairs (stdlib only, in a minimal container)
imports submodules of this package, so third-party code must never load from here.
The server-side facade is :mod:`sut.storage.backend`.
"""
