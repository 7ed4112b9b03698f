"""The storage harness: Crucible-style disks built from downstairs the framework runs.

downstairs (one downstairs: a process or a Docker container of either program), dsc (a set
of them with its control API and fault injection), crucible (a disk: a set plus the VCR that
names it, and the VCRs a test hands the server). Stands on phd.core.
"""
