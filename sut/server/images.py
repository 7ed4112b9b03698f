"""Open every file a spec names, under the path policy, for QEMU to use by descriptor.

QEMU would otherwise open files by NAME: the spec's kernel, initrd and disk images, and - for a
qcow2 overlay - the backing file named in the overlay's header (relative to the overlay),
then that file's backing file, and so on. A name checked by the server and opened later by
QEMU can be swapped in between, and a backing name in a header is input the server never
saw. So the server opens each file itself (sut.path_policy: a regular file under an allowed
root, the checked file is the opened file), follows a qcow2 backing chain by reading the
headers, and QEMU gets only descriptors: disks as fd sets (``-add-fd``; the -blockdev names
``/dev/fdset/N`` and spells out the whole backing chain, so QEMU opens no name from a header),
the kernel and initrd as ``/proc/self/fd/N`` (QEMU loads those with a plain ``open()``, which
does not understand fd sets; that path re-opens the inherited descriptor's own file).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from sut.path_policy import OpenedFile, PathPolicy, PathPolicyError
from sut.server.spec import BlobStorageBackend, FileStorageBackend, InstanceSpec

__all__ = ["ImageChain", "ImageLayer", "LaunchFiles", "open_spec_files"]

QCOW2_MAGIC = b"QFI\xfb"
MAX_CHAIN = 16  # deeper backing chains are not a test setup, they are an attack or a loop
_EXT_END, _EXT_BACKING_FORMAT = 0, 0xE2792ACA
_INCOMPAT_EXTERNAL_DATA = 1 << 2
_FORMATS = ("raw", "qcow2")


@dataclass(frozen=True)
class ImageLayer:
    format: str
    file: OpenedFile


@dataclass(frozen=True)
class ImageChain:
    """A disk image and its backing files, top first (a raw disk is a chain of one)."""

    layers: tuple[ImageLayer, ...]


@dataclass
class LaunchFiles:
    """The open files of one VM; closed once QEMU holds its own copies (or on failure)."""

    kernel: OpenedFile | None = None
    initrd: OpenedFile | None = None
    bootrom: OpenedFile | None = None
    # Keyed by the storage backend's component key.
    disks: dict[str, ImageChain] = field(default_factory=dict)

    @property
    def opened(self) -> list[OpenedFile]:
        files = [f for f in (self.kernel, self.initrd, self.bootrom) if f is not None]
        return files + [layer.file for chain in self.disks.values() for layer in chain.layers]

    @property
    def fds(self) -> list[int]:
        return [f.fd for f in self.opened]

    def close(self) -> None:
        for opened in self.opened:
            opened.close()

    def __enter__(self) -> LaunchFiles:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


@dataclass(frozen=True)
class _Qcow2Header:
    backing_name: str | None
    backing_format: str | None
    external_data: bool


def _read_qcow2_header(fd: int, what: str, shown: str) -> _Qcow2Header:
    head = os.pread(fd, 4096, 0)
    if len(head) < 72 or head[:4] != QCOW2_MAGIC:
        raise PathPolicyError(what, f"{shown} is not a qcow2 image (no qcow2 magic)", "not-qcow2")
    version, backing_offset, backing_size = struct.unpack(">IQI", head[4:20])
    incompatible, header_length = 0, 72
    if version >= 3 and len(head) >= 104:
        incompatible = struct.unpack(">Q", head[72:80])[0]
        header_length = struct.unpack(">I", head[100:104])[0]
    backing_format = None
    offset = header_length
    while offset + 8 <= len(head):
        kind, length = struct.unpack(">II", head[offset : offset + 8])
        if kind == _EXT_END:
            break
        if kind == _EXT_BACKING_FORMAT:
            backing_format = head[offset + 8 : offset + 8 + length].decode("ascii", "replace")
        offset += 8 + (length + 7) // 8 * 8
    name = None
    if backing_offset:
        if backing_size > 1023:
            raise PathPolicyError(what, f"{shown}: backing file name longer than 1023 bytes", "bad-qcow2")
        raw = os.pread(fd, backing_size, backing_offset)
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise PathPolicyError(what, f"{shown}: backing file name is not UTF-8", "bad-qcow2") from None
    return _Qcow2Header(name, backing_format, bool(incompatible & _INCOMPAT_EXTERNAL_DATA))


def _probe_format(fd: int) -> str:
    return "qcow2" if os.pread(fd, 4, 0) == QCOW2_MAGIC else "raw"


def open_chain(path: str, fmt: str, policy: PathPolicy, what: str, *, writable: bool) -> ImageChain:
    """Open ``path`` and, for qcow2, every backing file, each under ``policy``."""
    layers: list[ImageLayer] = []
    seen: set[tuple[int, int]] = set()
    name, layer_what = path, what
    layer_fmt: str | None = fmt
    try:
        while True:
            opened = policy.open(name, layer_what, writable=writable and not layers)
            # A backing file without a recorded format is probed on the open descriptor.
            fmt = layer_fmt or _probe_format(opened.fd)
            layers.append(ImageLayer(fmt, opened))
            st = os.fstat(opened.fd)
            if (st.st_dev, st.st_ino) in seen:
                raise PathPolicyError(what, f"backing chain of {path} loops at {name}", "backing-loop")
            seen.add((st.st_dev, st.st_ino))
            if fmt != "qcow2":
                return ImageChain(tuple(layers))
            header = _read_qcow2_header(opened.fd, layer_what, name)
            if header.external_data:
                raise PathPolicyError(layer_what, f"{name} keeps its data in an external data file, which "
                                      "this server does not open", "external-data-file")
            if header.backing_name is None:
                return ImageChain(tuple(layers))
            if len(layers) >= MAX_CHAIN:
                raise PathPolicyError(what, f"backing chain of {path} is deeper than {MAX_CHAIN} files",
                                      "backing-too-deep")
            # QEMU resolves a relative backing name against the directory of the image that
            # names it; the resolved name then goes through the same policy as any path.
            backing = os.path.join(os.path.dirname(name), header.backing_name)
            layer_what = f"{what} (backing file {header.backing_name!r} of {name})"
            if header.backing_format is not None and header.backing_format not in _FORMATS:
                raise PathPolicyError(layer_what, f"backing format {header.backing_format!r} is not one "
                                      f"of {list(_FORMATS)}", "backing-format")
            layer_fmt = header.backing_format
            name = backing
    except BaseException:
        for layer in layers:
            layer.file.close()
        raise


def _blob(key: str, backend: BlobStorageBackend) -> ImageChain:
    """A blob backend's bytes in an anonymous memory file (padded to whole sectors)."""
    data = backend.data()
    data += b"\0" * (-len(data) % 512)
    fd = os.memfd_create(f"blob-{key}", os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
    except BaseException:
        os.close(fd)
        raise
    return ImageChain((ImageLayer("raw", OpenedFile(fd, Path(f"/memfd:blob-{key}"), len(data),
                                                     writable=not backend.readonly)),))


def open_spec_files(spec: InstanceSpec, policy: PathPolicy, *, kernel: Path | None = None,
                    initrd: Path | None = None, bootrom: Path | None = None) -> LaunchFiles:
    """Open the kernel, initrd and bootrom (the server's command line: trusted, any directory)
    and every file backend (with backing chains, under ``policy``; the format is read from the
    image: qcow2 by its magic, else raw); raises :class:`PathPolicyError` naming the spec
    field, and then closes whatever it opened."""
    files = LaunchFiles()
    anywhere = PathPolicy(None)
    try:
        if kernel is not None:
            files.kernel = anywhere.open(kernel, "--kernel")
        if initrd is not None:
            files.initrd = anywhere.open(initrd, "--initrd")
        if bootrom is not None:
            files.bootrom = anywhere.open(bootrom, "BOOTROM")
        for key, component in spec.components.items():
            backend = component.component
            if isinstance(backend, FileStorageBackend):
                what = f"spec.components.{key}.component.path"
                probe = policy.open(str(backend.path), what)
                try:
                    fmt = _probe_format(probe.fd)
                finally:
                    probe.close()
                files.disks[key] = open_chain(str(backend.path), fmt, policy, what,
                                              writable=not backend.readonly)
            elif isinstance(backend, BlobStorageBackend):
                files.disks[key] = _blob(key, backend)
    except BaseException:
        files.close()
        raise
    return files
