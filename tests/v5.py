"""Builders of propolis-server 5.0.0 request bodies for the tests that speak HTTP directly.

The framework builds its own (`phd.vm.TestVm.spec`); these are for server tests that need a
spec with a given shape: a board, components as ``{type, component}``, an ensure body.
"""

from __future__ import annotations

import uuid
from typing import Any

PHD = "6ba7b811-9dad-11d1-80b4-00c04fd430c8"


def board(cpus: int = 1, memory_mb: int = 128) -> dict[str, Any]:
    chipset = {"type": "i440_fx", "value": {"enable_pcie": False}}
    return {"cpus": cpus, "memory_mb": memory_mb, "chipset": chipset}


def pci(slot: int) -> dict[str, int]:
    return {"bus": 0, "device": slot, "function": 0}


def disk(key: str, backend: dict[str, Any], *, interface: str = "virtio", slot: int = 0x10,
         backend_key: str | None = None) -> dict[str, Any]:
    """A disk device ``key`` and its storage backend (``<key>-backend`` unless named)."""
    bid = backend_key or f"{key}-backend"
    device: dict[str, Any] = {"backend_id": bid, "pci_path": pci(slot)}
    if interface == "nvme":
        device["serial_number"] = list(key.encode()[:20].ljust(20, b"\0"))
    return {key: {"type": f"{interface}_disk", "component": device}, bid: backend}


def file_backend(path: object, *, readonly: bool = False, block_size: int = 512) -> dict[str, Any]:
    return {"type": "file_storage_backend",
            "component": {"path": str(path), "readonly": readonly, "block_size": block_size}}


def crucible_backend(request_json: str, *, readonly: bool = False) -> dict[str, Any]:
    return {"type": "crucible_storage_backend",
            "component": {"request_json": request_json, "readonly": readonly}}


def serial() -> dict[str, Any]:
    return {"com1": {"type": "serial_port", "component": {"num": "com1"}}}


def nic(key: str = "net0", slot: int = 0x08) -> dict[str, Any]:
    return {key: {"type": "virtio_nic", "component": {"backend_id": f"{key}-backend", "interface_id": PHD,
                                                     "pci_path": pci(slot)}},
            f"{key}-backend": {"type": "virtio_network_backend", "component": {"vnic_name": key}}}


def boot_order(*devices: str) -> dict[str, Any]:
    return {"boot-settings": {"type": "boot_settings", "component": {"order": [{"id": d} for d in devices]}}}


def spec(*components: dict[str, Any], cpus: int = 1, memory_mb: int = 128) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for part in components:
        merged.update(part)
    return {"board": board(cpus, memory_mb), "components": merged}


def properties(name: str = "test", instance_id: str | None = None) -> dict[str, Any]:
    return {"id": instance_id or str(uuid.uuid4()), "name": name, "description": f"test instance {name}",
            "metadata": {"project_id": PHD, "silo_id": PHD, "sled_id": PHD, "sled_model": "test",
                         "sled_revision": 0, "sled_serial": "test"}}


def ensure(spec_body: dict[str, Any], name: str = "test", instance_id: str | None = None) -> dict[str, Any]:
    init = {"method": "Spec", "value": {"spec": spec_body}}
    return {"properties": properties(name, instance_id), "init": init}
