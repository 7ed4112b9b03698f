"""Kernel module selection: which ``.ko`` files the initramfs needs, in load order.

The initramfs has no ``modprobe``, so ``/init`` loads modules with plain ``insmod``
and the order must be computed at build time: a module fails with "Unknown
symbol" when a dependency is not loaded yet (``virtio`` before ``virtio_ring``).
The order comes from the kernel's own ``modules.dep`` rather than a hand-written
list so a new kernel with different dependencies still builds correctly.
"""

from __future__ import annotations

import gzip
import lzma
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ModuleError",
    "ModuleFile",
    "load_order",
    "module_name",
    "parse_builtin",
    "parse_modules_dep",
    "read_module",
]

_SUFFIXES = (".ko.xz", ".ko.zst", ".ko.gz", ".ko")


class ModuleError(Exception):
    """A requested module cannot be resolved from the kernel's module tree."""


@dataclass(frozen=True)
class ModuleFile:
    """One module to put into the initramfs: its canonical name and path in the tree."""

    name: str
    relpath: str


def module_name(path: str) -> str:
    """Canonical module name of a ``modules.dep`` path.

    The kernel treats ``-`` and ``_`` in module names as the same character
    (``nvme-core.ko`` is the module ``nvme_core``), so names are normalised to
    ``_`` and callers may spell them either way.
    """
    base = path.rsplit("/", 1)[-1]
    for suffix in _SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, tuple[str, list[str]]]:
    """Map module name -> (its path, paths of ALL its dependencies) from ``modules.dep``."""
    table: dict[str, tuple[str, list[str]]] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        path, sep, deps = line.partition(":")
        if not sep:
            raise ModuleError(f"modules.dep line {lineno} has no ':': {raw!r}")
        table[module_name(path.strip())] = (path.strip(), deps.split())
    return table


def parse_builtin(text: str) -> set[str]:
    """Names of modules compiled into the kernel (``modules.builtin``)."""
    return {module_name(line.strip()) for line in text.splitlines() if line.strip()}


def load_order(
    deps: Mapping[str, tuple[str, list[str]]],
    wanted: Iterable[str],
    builtin: Iterable[str] = (),
) -> list[ModuleFile]:
    """Every module needed for ``wanted``, each after all of its dependencies.

    Depth-first post-order over the dependency graph; ``wanted`` order is kept
    where the graph allows, so the result is stable for a given kernel. Modules
    built into the kernel need no file and are skipped.
    """
    builtin_names = set(builtin)
    order: list[ModuleFile] = []
    done: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in done or name in builtin_names:
            return
        if name in chain:
            cycle = " -> ".join((*chain, name))
            raise ModuleError(f"dependency cycle in modules.dep: {cycle}")
        entry = deps.get(name)
        if entry is None:
            via = f" (needed by {chain[-1]})" if chain else ""
            raise ModuleError(
                f"module {name!r}{via} is neither in modules.dep nor built in: "
                "check the module name or the kernel package"
            )
        path, dep_paths = entry
        # depmod lists a module's dependencies so that the LAST one loads first
        # (modprobe walks the list backwards); keep that order for insmod.
        for dep_path in reversed(dep_paths):
            visit(module_name(dep_path), (*chain, name))
        done.add(name)
        order.append(ModuleFile(name=name, relpath=path))

    for want in wanted:
        visit(want.replace("-", "_"), ())
    return order


def read_module(path: Path) -> bytes:
    """The plain ELF bytes of a module file, decompressing ``.xz``/``.zst``/``.gz``.

    busybox ``insmod`` loads only uncompressed modules, and some Debian kernels
    ship compressed ones.
    """
    name = path.name
    if name.endswith(".ko.xz"):
        return lzma.decompress(path.read_bytes())
    if name.endswith(".ko.gz"):
        return gzip.decompress(path.read_bytes())
    if name.endswith(".ko.zst"):
        # No zstd in the standard library; the zstd tool comes with ci/bootstrap.
        try:
            done = subprocess.run(  # noqa: S603 - fixed argv, no shell
                ["zstd", "-q", "-d", "-c", str(path)],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                check=False,
            )
        except FileNotFoundError as exc:
            raise ModuleError(
                f"{path} is zstd-compressed and the 'zstd' tool is missing: run ci/bootstrap"
            ) from exc
        if done.returncode != 0:
            raise ModuleError(f"zstd -d {path} failed: {done.stderr.decode(errors='replace')}")
        return done.stdout
    return path.read_bytes()
