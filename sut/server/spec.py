"""Pydantic models of propolis-server 5.0.0's instance spec and request bodies.

The shapes are the published OpenAPI document's (``InstanceEnsureRequest``,
``InstanceSpec``, the ``Component`` tagged union ``{type, component}``, ...), field for
field, with ``additionalProperties: false`` where the document says so. Validation happens
here so a bad request is answered 400 naming the field, instead of failing later inside QEMU.
Where the document allows more than this server can do (a PCI bridge, a CPUID template, a
migration target), the request is answered 400 saying so: the document allows any 4XX.

Things v5 has no field for are never fields here: the guest kernel, initrd and command line
for direct kernel boot, the host forwards of the user-mode NIC and the data dir are the
server's command line (``sut.server.cli``), the file format of a disk image is read from the
image itself (``sut.server.images``).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal
from uuid import UUID

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    StrictBool,
    StrictInt,
    field_validator,
    model_validator,
)

# Component keys end up in QEMU ids, node names and unix socket file names.
_KEY_RE = r"[A-Za-z][A-Za-z0-9_-]{0,31}"
_KEY = re.compile(rf"^{_KEY_RE}$")
KEY_PATTERN = rf"^{_KEY_RE}$"

# Strict: the document says integer (or boolean), so false, 1.0 and "1" are refused, not
# coerced (a fuzzer sending them must get 400).
U8 = Annotated[StrictInt, Field(ge=0, le=255)]
U32 = Annotated[StrictInt, Field(ge=0, le=2**32 - 1)]
U64 = Annotated[StrictInt, Field(ge=0, le=2**64 - 1)]


def _shown_path(value: Path) -> str:
    # JSON can carry lone surrogates ("\ud800") that no file name has; escaped here,
    # because pydantic cannot build an error message that contains one.
    text = str(value).encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= 200 else f"{text[:200]}... ({len(text)} characters)"


class _Strict(BaseModel):
    # The document's additionalProperties: false.
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Open(BaseModel):
    # Objects the document leaves open: unknown keys are accepted (and ignored).
    model_config = ConfigDict(extra="ignore", frozen=True)


# --- board ---------------------------------------------------------------------------


class I440Fx(_Strict):
    enable_pcie: StrictBool


class Chipset(_Strict):
    type: Literal["i440_fx"]
    value: I440Fx


class CpuidEntry(_Strict):
    leaf: U32
    subleaf: U32 | None = None
    eax: U32
    ebx: U32
    ecx: U32
    edx: U32


class Cpuid(_Strict):
    entries: list[CpuidEntry]
    vendor: Literal["amd", "intel"]


class HyperVValue(_Strict):
    features: list[Literal["reference_tsc"]]


class GuestHvInterface(_Strict):
    type: Literal["bhyve", "hyper_v"]
    value: HyperVValue | None = None


class Board(_Strict):
    chipset: Chipset
    # The document allows 0..255 vCPUs and any u64 of memory; this server runs 1..32 vCPUs
    # and 32 MiB..64 GiB (a 4XX beyond, as the document allows).
    cpus: StrictInt = Field(ge=1, le=32)
    memory_mb: StrictInt = Field(ge=32, le=65536)
    cpuid: Cpuid | None = None
    guest_hv_interface: GuestHvInterface | None = None

    @model_validator(mode="after")
    def _supported(self) -> Board:
        if self.cpuid is not None:
            raise ValueError("cpuid: this server (QEMU, TCG or KVM) derives CPUID itself; send null")
        if self.guest_hv_interface is not None and self.guest_hv_interface.type != "bhyve":
            raise ValueError("guest_hv_interface: only the default (bhyve) interface is supported")
        return self


# --- components ----------------------------------------------------------------------


class PciPath(_Open):
    bus: U8
    device: U8
    function: U8

    @model_validator(mode="after")
    def _on_the_root_bus(self) -> PciPath:
        # One root bus (no bridges), function 0 only: every device is a slot of its own.
        # Slot 0 is the host bridge and 31 the chipset's (q35's ICH9).
        if self.bus != 0 or self.function != 0 or not 1 <= self.device <= 30:
            raise ValueError(f"pci_path {self.bus}.{self.device}.{self.function}: this server places "
                             "devices at bus 0, device 1..30, function 0")
        return self

    def qemu_addr(self) -> str:
        return f"bus=pcie.0,addr=0x{self.device:x}.{self.function}"


SpecKey = Annotated[str, Field(pattern=KEY_PATTERN, max_length=32)]


class VirtioDisk(_Strict):
    backend_id: SpecKey
    pci_path: PciPath


class NvmeDisk(_Strict):
    backend_id: SpecKey
    pci_path: PciPath
    serial_number: list[U8] = Field(min_length=20, max_length=20)

    def serial_text(self) -> str:
        """The serial number as QEMU takes it: printable ASCII, NUL / space padding dropped."""
        raw = bytes(self.serial_number).rstrip(b"\0 ")
        return raw.decode("ascii")

    @field_validator("serial_number")
    @classmethod
    def _printable(cls, value: list[int]) -> list[int]:
        raw = bytes(value).rstrip(b"\0 ")
        if not all(0x21 <= b <= 0x7E or b == 0x20 for b in raw):
            raise ValueError("serial_number: printable ASCII, padded with NUL or spaces")
        return value


class VirtioNic(_Strict):
    backend_id: SpecKey
    interface_id: UUID
    pci_path: PciPath


class SerialPort(_Strict):
    num: Literal["com1", "com2", "com3", "com4"]

    @field_validator("num")
    @classmethod
    def _com1(cls, value: str) -> str:
        if value != "com1":
            raise ValueError(f"{value}: this server has one serial port, com1")
        return value


class QemuPvpanic(_Strict):
    enable_isa: StrictBool


class BootOrderEntry(_Open):
    id: SpecKey


class BootSettings(_Strict):
    order: list[BootOrderEntry]


class MigrationFailureInjector(_Strict):
    # Fails this many migration exports (on a source) or imports (on a target): sut.server.migration.
    fail_exports: U32
    fail_imports: U32


class CrucibleStorageBackend(_Strict):
    request_json: str = Field(min_length=2)
    readonly: StrictBool


class FileStorageBackend(_Strict):
    path: Path
    readonly: StrictBool
    block_size: Annotated[StrictInt, Field(ge=0, le=2**32 - 1)]
    workers: StrictInt | None = Field(default=None, ge=1, le=2**32 - 1)

    @field_validator("block_size")
    @classmethod
    def _block_size(cls, value: int) -> int:
        if value not in (512, 4096):
            raise ValueError(f"block_size: this server takes 512 or 4096, got {value}")
        return value

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        # Shape only: whether the file may be used is the path policy's (sut.path_policy),
        # checked when the instance is created, where the file is also opened.
        if not value.is_absolute():
            raise ValueError(f"path must be absolute, got {_shown_path(value)!r}")
        return value


class BlobStorageBackend(_Strict):
    base64: str
    readonly: StrictBool

    def data(self) -> bytes:
        return base64.b64decode(self.base64, validate=True)

    @field_validator("base64")
    @classmethod
    def _decodes(cls, value: str) -> str:
        try:
            base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("base64: not valid base64") from None
        return value


class VirtioNetworkBackend(_Strict):
    # A viona VNIC on illumos; here a QEMU user-mode network (restricted to the host
    # forwards of the server's --forward options). The name is only a label.
    vnic_name: str = Field(max_length=64)


Device = VirtioDisk | NvmeDisk | VirtioNic
StorageBackend = CrucibleStorageBackend | FileStorageBackend | BlobStorageBackend


def _component(type_name: str, model: type[BaseModel]) -> type[BaseModel]:
    return type(
        f"{model.__name__}Component",
        (_Strict,),
        {"__annotations__": {"type": Literal[type_name], "component": model}, "__module__": __name__},
    )


_SUPPORTED: dict[str, type[BaseModel]] = {
    "virtio_disk": VirtioDisk,
    "nvme_disk": NvmeDisk,
    "virtio_nic": VirtioNic,
    "serial_port": SerialPort,
    "qemu_pvpanic": QemuPvpanic,
    "boot_settings": BootSettings,
    "migration_failure_injector": MigrationFailureInjector,
    "crucible_storage_backend": CrucibleStorageBackend,
    "file_storage_backend": FileStorageBackend,
    "blob_storage_backend": BlobStorageBackend,
    "virtio_network_backend": VirtioNetworkBackend,
}
# In the document, not in this server (illumos devices, bridges, vsock, 9p).
UNSUPPORTED = ("pci_pci_bridge", "virtio_socket", "soft_npu_pci_port", "soft_npu_port", "soft_npu_p9",
               "p9fs", "dlpi_network_backend")
COMPONENT_TYPES = {name: _component(name, model) for name, model in _SUPPORTED.items()}


class UnsupportedComponent(_Strict):
    type: str
    component: JsonValue

    @model_validator(mode="after")
    def _refuse(self) -> UnsupportedComponent:
        if self.type in UNSUPPORTED:
            raise ValueError(f"component type {self.type!r} is not supported by this server "
                             f"(supported: {', '.join(_SUPPORTED)})")
        raise ValueError(f"unknown component type {self.type!r}; one of {', '.join(_SUPPORTED)}")


class Component(BaseModel):
    """``{"type": ..., "component": {...}}``: parsed by its tag, so an error names the field
    of the component the caller meant instead of listing every union member."""

    model_config = ConfigDict(frozen=True)

    type: str
    component: BaseModel

    @model_validator(mode="wrap")
    @classmethod
    def _by_tag(cls, value: object, handler):  # type: ignore[no-untyped-def]
        if isinstance(value, Component):
            return value
        if isinstance(value, dict) and isinstance(value.get("type"), str):
            model = COMPONENT_TYPES.get(value["type"])
            if model is not None:
                parsed = model.model_validate(value)
                return cls.model_construct(type=value["type"], component=parsed.component)  # type: ignore[attr-defined]
            UnsupportedComponent.model_validate(value)
        return handler(value)

    @property
    def body(self) -> BaseModel:
        return self.component

    def dump(self) -> dict[str, object]:
        return {"type": self.type, "component": self.component.model_dump(mode="json", exclude_none=True)}


class SmbiosType1Input(_Strict):
    manufacturer: str = Field(max_length=256)
    product_name: str = Field(max_length=256)
    serial_number: str = Field(max_length=256)
    version: U64


class InstanceSpec(_Open):
    board: Board
    components: dict[str, Component]
    smbios: SmbiosType1Input | None = None

    @field_validator("components", mode="before")
    @classmethod
    def _keys(cls, value: object) -> object:
        # "before": a bad key is reported even when its component is also invalid.
        for key in value if isinstance(value, dict) else ():
            if not _KEY.match(key):
                raise ValueError(f"invalid component key {key!r}: use a letter then up to 31 of "
                                 "[A-Za-z0-9_-]")
        return value

    def of(self, *kinds: type[BaseModel]) -> dict[str, BaseModel]:
        return {key: c.component for key, c in self.components.items() if isinstance(c.component, kinds)}

    @property
    def devices(self) -> dict[str, VirtioDisk | NvmeDisk | VirtioNic]:
        """Devices in PCI order (the order a guest finds them)."""
        found = {key: c.component for key, c in self.components.items()
                 if isinstance(c.component, VirtioDisk | NvmeDisk | VirtioNic)}
        return dict(sorted(found.items(), key=lambda kv: kv[1].pci_path.device))

    @property
    def disks(self) -> dict[str, VirtioDisk | NvmeDisk]:
        """Disk devices in PCI order."""
        return {key: d for key, d in self.devices.items() if isinstance(d, VirtioDisk | NvmeDisk)}

    @property
    def nics(self) -> dict[str, VirtioNic]:
        return {key: d for key, d in self.devices.items() if isinstance(d, VirtioNic)}

    def storage(self, backend_id: str) -> StorageBackend:
        backend = self.components[backend_id].component
        assert isinstance(backend, CrucibleStorageBackend | FileStorageBackend | BlobStorageBackend)
        return backend

    @property
    def boot_order(self) -> list[str]:
        settings = self.of(BootSettings)
        return [entry.id for s in settings.values() for entry in s.order]  # type: ignore[attr-defined]

    @property
    def has_serial(self) -> bool:
        return bool(self.of(SerialPort))

    @property
    def pvpanic(self) -> bool:
        return any(p.enable_isa for p in self.of(QemuPvpanic).values())  # type: ignore[attr-defined]

    @model_validator(mode="after")
    def _references(self) -> InstanceSpec:
        storage = self.of(CrucibleStorageBackend, FileStorageBackend, BlobStorageBackend)
        network = self.of(VirtioNetworkBackend)
        used: dict[str, str] = {}
        slots: dict[int, str] = {}
        for key, device in self.devices.items():
            wanted, kind = (network, "virtio_network_backend") if isinstance(device, VirtioNic) else (
                storage, "a storage backend")
            if device.backend_id not in wanted:
                raise ValueError(f"components.{key}.backend_id: {device.backend_id!r} is not {kind} "
                                 f"of this spec (those: {sorted(wanted)})")
            if device.backend_id in used:
                raise ValueError(f"components.{key}.backend_id: {device.backend_id!r} is already the "
                                 f"backend of {used[device.backend_id]}")
            used[device.backend_id] = key
            slot = device.pci_path.device
            if slot in slots:
                raise ValueError(f"components.{key}.pci_path: device {slot} is taken by {slots[slot]}")
            slots[slot] = key
        unused = sorted((set(storage) | set(network)) - set(used))
        if unused:
            raise ValueError(f"backends {unused} belong to no device")
        if len(self.of(BootSettings)) > 1:
            raise ValueError("at most one boot_settings component")
        for entry in self.boot_order:
            if entry not in self.disks:
                raise ValueError(f"boot_settings: order names {entry!r}, which is not a disk device "
                                 f"(disks: {sorted(self.disks)})")
        return self


class InstanceMetadata(_Open):
    project_id: UUID
    silo_id: UUID
    sled_id: UUID
    sled_model: str = Field(max_length=256)
    sled_revision: U32
    sled_serial: str = Field(max_length=256)


class InstanceProperties(_Open):
    id: UUID
    name: str = Field(min_length=1, max_length=63)
    description: str = Field(max_length=1024)
    metadata: InstanceMetadata

    @model_validator(mode="after")
    def _echoable(self) -> InstanceProperties:
        # Echoed by every GET /instance: a lone surrogate would turn each of those into a 500.
        for text in (self.name, self.description, self.metadata.sled_model, self.metadata.sled_serial):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ValueError(f"cannot be echoed back as JSON: {exc}") from None
        return self


class SpecInit(_Open):
    spec: InstanceSpec


class _FailureInjectorReplacement(_Strict):
    component: Literal["MigrationFailureInjector"]
    spec: MigrationFailureInjector


class _CrucibleReplacement(_Strict):
    component: Literal["CrucibleStorageBackend"]
    spec: CrucibleStorageBackend


class _NetworkReplacement(_Strict):
    component: Literal["VirtioNetworkBackend"]
    spec: VirtioNetworkBackend


# The document's ReplacementComponent, tagged by "component".
ReplacementComponent = Annotated[
    _FailureInjectorReplacement | _CrucibleReplacement | _NetworkReplacement,
    Field(discriminator="component"),
]
# Which spec component type each replacement replaces.
REPLACES = {"MigrationFailureInjector": "migration_failure_injector",
            "CrucibleStorageBackend": "crucible_storage_backend",
            "VirtioNetworkBackend": "virtio_network_backend"}


class MigrationTargetInit(_Open):
    migration_id: UUID
    replace_components: dict[SpecKey, ReplacementComponent]
    # The source server's address, "IP:PORT" (sut.server.migration checks it is allowed).
    src_addr: str = Field(max_length=64)


class SpecMethod(_Open):
    method: Literal["Spec"]
    value: SpecInit


class MigrationTargetMethod(_Open):
    method: Literal["MigrationTarget"]
    value: MigrationTargetInit


InstanceInit = Annotated[SpecMethod | MigrationTargetMethod, Field(discriminator="method")]


class InstanceEnsureRequest(_Open):
    properties: InstanceProperties
    init: InstanceInit

    @property
    def spec(self) -> InstanceSpec:
        """The spec of a ``Spec`` init (a migration target's comes from its source)."""
        if not isinstance(self.init, SpecMethod):
            raise ValueError("a MigrationTarget init carries no spec: it comes from the source")
        return self.init.value.spec

    @property
    def migration_target(self) -> MigrationTargetInit | None:
        return self.init.value if isinstance(self.init, MigrationTargetMethod) else None


def apply_replacements(source_spec: object, replacements: Mapping[str, BaseModel]) -> InstanceSpec:
    """A migration target's spec: the source's, with ``replace_components`` swapped in.

    Each replaced key must name a component of the source's spec of the same kind (a
    replacement replaces; it never adds a device the source's guest has not seen).
    Raises ValueError naming the key.
    """
    spec = InstanceSpec.model_validate(source_spec)
    components = dict(spec.components)
    for key, replacement in replacements.items():
        kind = REPLACES[replacement.component]  # type: ignore[attr-defined]
        current = components.get(key)
        if current is None:
            raise ValueError(f"replace_components.{key}: the source's spec has no component {key!r} "
                             f"(its components: {sorted(components)})")
        if current.type != kind:
            raise ValueError(f"replace_components.{key}: replaces a {current.type}, not a {kind}")
        components[key] = Component.model_validate(
            {"type": kind, "component": replacement.spec.model_dump(mode="json")})  # type: ignore[attr-defined]
    return InstanceSpec.model_validate({**spec.model_dump(mode="python", exclude={"components"}),
                                        "components": {k: c.dump() for k, c in components.items()}})


def spec_json(spec: InstanceSpec) -> dict[str, object]:
    """The spec as the document's InstanceSpec JSON (what a migration source sends)."""
    value: dict[str, object] = {
        "board": spec.board.model_dump(mode="json", exclude_none=True),
        "components": {key: c.dump() for key, c in spec.components.items()},
    }
    if spec.smbios is not None:
        value["smbios"] = spec.smbios.model_dump(mode="json")
    return value


class VcrReplaceRequest(_Open):
    vcr_json: str


class StateMonitorRequest(_Open):
    gen: U64


def properties_json(properties: InstanceProperties) -> dict[str, object]:
    out: dict[str, object] = json.loads(properties.model_dump_json())
    return out
