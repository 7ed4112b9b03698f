"""Pydantic models of the instance SPEC (architecture.md, CONTRACT: server HTTP API).

Validation happens here so a bad request is answered 400 with the field that
is wrong, instead of failing later inside QEMU with an obscure message.
"""

from __future__ import annotations

import ipaddress
import json
import re
from pathlib import Path
from typing import Annotated, Literal
from uuid import UUID

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    JsonValue,
    Tag,
    field_validator,
    model_validator,
)

# Device names end up in QEMU ids, node names and unix socket file names.
_DEVICE_NAME_RE = r"[A-Za-z][A-Za-z0-9_-]{0,31}"
_DEVICE_NAME = re.compile(rf"^{_DEVICE_NAME_RE}$")
# A backend id is "<device>-backend" (see backend_id()); the API rejects any
# other shape (slashes, "..", NUL, ...) with 400 before looking it up.
BACKEND_ID_PATTERN = rf"^{_DEVICE_NAME_RE}-backend$"


# Documentation only (the validators below enforce it): lets /openapi.json say that
# paths are absolute and which device names are valid, so a client generated from the
# document, or a fuzzer, knows the shape without reading this module.
_ABSOLUTE_PATH_SCHEMA: dict[str, JsonValue] = {"pattern": "^/"}
_DEVICE_NAMES_SCHEMA: dict[str, JsonValue] = {"propertyNames": {"pattern": _DEVICE_NAME.pattern}}
AbsolutePath = Annotated[Path, Field(json_schema_extra=_ABSOLUTE_PATH_SCHEMA)]


def _shown_path(value: Path) -> str:
    # JSON can carry lone surrogates ("\ud800") that no file name has; escaped here,
    # because pydantic cannot build an error message that contains one.
    text = str(value).encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= 200 else f"{text[:200]}... ({len(text)} characters)"


def _absolute(value: Path) -> Path:
    # Shape only: whether the file may be used (exists, is a regular file under an allowed
    # root, and so on) is the server's path policy, checked when the instance is created
    # (sut.path_policy, sut.server.images), where the file is also opened.
    if not value.is_absolute():
        raise ValueError(f"path must be absolute, got {_shown_path(value)!r}")
    return value


class _Model(BaseModel):
    # Unknown keys are typos far more often than extensions: reject them.
    model_config = ConfigDict(extra="forbid", frozen=True)


class Board(_Model):
    cpus: int = Field(default=2, ge=1, le=32)
    memory_mib: int = Field(default=512, ge=32, le=65536)


class KernelBoot(_Model):
    kernel: AbsolutePath
    initrd: AbsolutePath | None = None
    # The kernel command line is one argv element (never parsed as QEMU options); NUL cannot
    # be passed in an argv at all.
    cmdline: str = Field(default="console=ttyS0", max_length=4096, pattern=r"^[^\x00]*$")

    @field_validator("kernel", "initrd")
    @classmethod
    def _kernel_is_absolute(cls, value: Path | None) -> Path | None:
        return None if value is None else _absolute(value)


class FirmwareBoot(_Model):
    firmware: Literal["bios"]
    order: list[str] = Field(default_factory=list)


class FileBackend(_Model):
    type: Literal["file"]
    path: AbsolutePath
    readonly: bool = False
    # qcow2 lets a test boot from a copy-on-write overlay of a guest image (the overlay names
    # its backing file; QEMU opens that read-only). Extension to the CONTRACT; default raw.
    format: Literal["raw", "qcow2"] = "raw"

    @field_validator("path")
    @classmethod
    def _path_is_absolute(cls, value: Path) -> Path:
        return _absolute(value)


class CrucibleBackendSpec(_Model):
    type: Literal["crucible"]
    request_json: str = Field(min_length=2)
    readonly: bool = False


def _boot_kind(value: object) -> str:
    # Pick the variant from its keys so an error names the field of the
    # variant the caller meant instead of listing every union member.
    if isinstance(value, dict):
        return "firmware" if "firmware" in value else "kernel"
    return "firmware" if isinstance(value, FirmwareBoot) else "kernel"


Boot = Annotated[
    Annotated[KernelBoot, Tag("kernel")] | Annotated[FirmwareBoot, Tag("firmware")],
    Discriminator(_boot_kind),
]

DiskBackend = Annotated[FileBackend | CrucibleBackendSpec, Field(discriminator="type")]


class Disk(_Model):
    interface: Literal["virtio", "nvme"]
    backend: DiskBackend


class Forward(_Model):
    # The pattern documents the shape; _loopback() below enforces it (and the range).
    host: str = Field(json_schema_extra={"pattern": r"^127\.\d{1,3}\.\d{1,3}\.\d{1,3}:\d{1,5}$"})
    guest_port: int = Field(ge=1, le=65535)

    @field_validator("host")
    @classmethod
    def _loopback(cls, value: str) -> str:
        addr, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"expected '127.0.0.1:PORT', got {value!r}")
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError as exc:
            raise ValueError(f"expected '127.0.0.1:PORT', got {value!r}") from exc
        if not (ip.version == 4 and ip.is_loopback):
            # Network rule: forwards are only ever published on loopback.
            raise ValueError(f"host forwards must bind a 127.0.0.0/8 address, got {addr}")
        return value

    @property
    def host_addr(self) -> str:
        return self.host.rpartition(":")[0]

    @property
    def host_port(self) -> int:
        return int(self.host.rpartition(":")[2])


class Nic(_Model):
    type: Literal["user"]
    forwards: list[Forward] = Field(default_factory=list)


class InstanceSpec(_Model):
    board: Board = Field(default_factory=Board)
    boot: Boot
    disks: dict[str, Disk] = Field(default_factory=dict, json_schema_extra=_DEVICE_NAMES_SCHEMA)
    nics: dict[str, Nic] = Field(default_factory=dict, json_schema_extra=_DEVICE_NAMES_SCHEMA)

    @field_validator("disks", "nics", mode="before")
    @classmethod
    def _names(cls, value: object) -> object:
        # "before": a bad name is reported even when the entry is also invalid.
        for name in value if isinstance(value, dict) else ():
            if not _DEVICE_NAME.match(name):
                raise ValueError(f"invalid device name {name!r}: use a letter then up to 31 of [A-Za-z0-9_-]")
        return value

    @model_validator(mode="after")
    def _boot_order(self) -> InstanceSpec:
        if isinstance(self.boot, FirmwareBoot):
            unknown = [name for name in self.boot.order if name not in self.disks]
            if unknown:
                raise ValueError(f"boot.order names unknown disks {unknown}; known: {sorted(self.disks)}")
        return self


class InstanceProperties(BaseModel):
    # Propolis carries more descriptive fields; accept and echo them back.
    model_config = ConfigDict(extra="allow", frozen=True)

    id: UUID
    name: str = Field(min_length=1, max_length=63)

    @model_validator(mode="after")
    def _echoable_extras(self) -> InstanceProperties:
        # Extra fields are echoed by every GET /instance: one that cannot be written
        # back as JSON (a lone surrogate, Infinity) would turn each of those into a 500.
        for key, value in (self.model_extra or {}).items():
            try:
                json.dumps(value, allow_nan=False, ensure_ascii=False).encode("utf-8")
            except (ValueError, UnicodeEncodeError) as exc:
                raise ValueError(f"extra field {key!r} cannot be echoed back as JSON: {exc}") from None
        return self


class InstanceEnsureRequest(_Model):
    properties: InstanceProperties
    spec: InstanceSpec


class VcrReplaceRequest(_Model):
    vcr_json: str = Field(min_length=2)


def backend_id(device: str) -> str:
    """The backend id of a disk device (CONTRACT: ``<device>-backend``)."""
    return f"{device}-backend"
