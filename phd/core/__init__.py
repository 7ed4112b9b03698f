"""The base every other part of phd stands on; imports nothing of phd outside this folder.

errors (the exception families), wait (the one wait/retry loop), process (ManagedProcess:
every process a test starts), reaper (the ledger that reaps a killed run's processes),
ports (loopback port slots, black holes), teardown (undo steps that all run), progress
(build progress lines and the cross-worker build lock).
"""
