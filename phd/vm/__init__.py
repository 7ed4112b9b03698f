"""The VM harness: a server under test per VM, driven over its API, console and SSH.

server (the server process), client (its HTTP API), serial (the console websocket), guest
(guest adapters: login, framed commands), ssh, status (what a command's exit status must
be), testvm (TestVm: one VM under test), factory (VmFactory / DiskFactory: what a test
asks for), lifecycle (run_lifecycle). Stands on phd.core, phd.artifacts (the guest's
files) and phd.storage (a VM's Crucible disks).
"""
