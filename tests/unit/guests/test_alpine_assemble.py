"""The alpine recipe's assembly and cache, on a stand-in tarball with the minirootfs layout.

The real tarball cannot be downloaded on the build machines, so this builds a small one
with the same shape (musl loader, busybox and its applet links, Alpine's /etc files, a
locked root password, a hard link) and checks what the recipe makes of it. The real
tarball's path (download -> build -> boot) is exercised only where it is available.
"""

from __future__ import annotations

import hashlib
import io
import json
import stat
import tarfile
from pathlib import Path

import pytest

from guests.alpine import build as alpine_build
from guests.alpine.assemble import MODULE_DIR, Assembled, AssemblyError, rootfs_archive
from guests.alpine.build import CMDLINE, LOGIN_PROMPT, SHELL_PROMPT, BuildError, Inputs, build, main
from guests.common.debian import Package
from phd.vm.guest import AlpineGuest, adapter_for

from .test_common_cpio import parse_newc

Entries = dict[str, tuple[int, bytes, int, int]]

BUSYBOX = b"\x7fELF musl busybox stand-in"
ALPINE_SHADOW = b"root:*:19000:0:::::\nbin:!::0:::::\nnobody:!::0:::::\n"
ALPINE_INITTAB = b"::sysinit:/sbin/openrc sysinit\ntty1::respawn:/sbin/getty 38400 tty1\n"


def standin_minirootfs(path: Path, *, drop: str = "", extra: tarfile.TarInfo | None = None) -> Path:
    """A tarball laid out like alpine-minirootfs-3.20.3-x86_64.tar.gz (members start with ./)."""
    with tarfile.open(path, "w:gz") as tar:
        def add(name: str, kind: bytes, mode: int, data: bytes = b"", link: str = "") -> None:
            if name == drop:
                return
            info = tarfile.TarInfo(f"./{name}")
            info.type, info.mode, info.linkname = kind, mode, link
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

        for directory in ("bin", "sbin", "etc", "lib", "usr", "usr/bin", "dev", "proc", "sys", "run"):
            add(directory, tarfile.DIRTYPE, 0o755)
        add("tmp", tarfile.DIRTYPE, 0o1777)
        add("root", tarfile.DIRTYPE, 0o700)
        add("lib/ld-musl-x86_64.so.1", tarfile.REGTYPE, 0o755, b"\x7fELF musl")
        add("lib/libc.musl-x86_64.so.1", tarfile.SYMTYPE, 0o777, link="ld-musl-x86_64.so.1")
        add("bin/busybox", tarfile.REGTYPE, 0o755, BUSYBOX)
        for applet in ("bin/sh", "bin/mount", "bin/hostname", "bin/login", "sbin/init", "sbin/getty",
                       "sbin/insmod"):
            add(applet, tarfile.SYMTYPE, 0o777, link="/bin/busybox")
        add("bin/bbsuid", tarfile.REGTYPE, 0o4111, b"\x7fELF bbsuid")
        add("usr/bin/bbsuid-copy", tarfile.LNKTYPE, 0o4111, link="./bin/bbsuid")
        add("etc/alpine-release", tarfile.REGTYPE, 0o644, b"3.20.3\n")
        add("etc/hostname", tarfile.REGTYPE, 0o644, b"alpine\n")
        add("etc/passwd", tarfile.REGTYPE, 0o644, b"root:x:0:0:root:/root:/bin/sh\n")
        add("etc/shadow", tarfile.REGTYPE, 0o640, ALPINE_SHADOW)
        add("etc/securetty", tarfile.REGTYPE, 0o644, b"console\ntty1\n")
        add("etc/inittab", tarfile.REGTYPE, 0o644, ALPINE_INITTAB)
        add("etc/profile", tarfile.REGTYPE, 0o644, b"PS1='\\h:\\w\\$ '\n")
        if extra is not None:
            tar.addfile(extra, io.BytesIO(b""))
    return path


MODULES = (("virtio_ring", b"\x7fELF ring"), ("virtio_pci", b"\x7fELF pci"), ("virtio_blk", b"\x7fELF blk"))


@pytest.fixture(scope="module")
def assembled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Entries, str]:
    tarball = standin_minirootfs(tmp_path_factory.mktemp("alpine") / "minirootfs.tar.gz")
    archive, release = rootfs_archive(tarball, MODULES)
    return parse_newc(archive.to_cpio()), release


def text(entries: Entries, name: str) -> str:
    return entries[name][1].decode()


def test_the_userland_is_kept_as_it_is(assembled: tuple[Entries, str]) -> None:
    entries, release = assembled
    assert release == "3.20.3"
    mode, data, _, _ = entries["bin/busybox"]
    assert (stat.S_ISREG(mode), stat.S_IMODE(mode), data) == (True, 0o755, BUSYBOX)
    mode, data, _, _ = entries["sbin/init"]
    assert stat.S_ISLNK(mode) and data == b"/bin/busybox"
    assert entries["lib/libc.musl-x86_64.so.1"][1] == b"ld-musl-x86_64.so.1"
    assert stat.S_IMODE(entries["bin/bbsuid"][0]) == 0o4111
    # newc has no hard links here: the link becomes a copy with the same bytes.
    assert entries["usr/bin/bbsuid-copy"][1] == b"\x7fELF bbsuid"
    assert stat.S_IMODE(entries["tmp"][0]) == 0o1777
    assert stat.S_IMODE(entries["root"][0]) == 0o700
    assert entries["etc/passwd"][1] == b"root:x:0:0:root:/root:/bin/sh\n"


def test_inittab_mounts_before_the_getty_on_ttys0(assembled: tuple[Entries, str]) -> None:
    entries, _ = assembled
    inittab = text(entries, "etc/inittab")
    assert "openrc" not in inittab, "the minirootfs' OpenRC inittab is replaced"
    lines = [line for line in inittab.splitlines() if line and not line.startswith("#")]
    getty = lines.index("ttyS0::respawn:/sbin/getty -L 115200 ttyS0 vt100")
    for step in ("/bin/mount -t devtmpfs devtmpfs /dev", "/bin/mount -t proc proc /proc",
                 "/bin/mount -t sysfs sysfs /sys", "/bin/sh /etc/phd/load-modules",
                 "/bin/hostname -F /etc/hostname"):
        assert lines.index(f"::sysinit:{step}") < getty, step
    assert lines[0] == "::sysinit:/bin/mount -t devtmpfs devtmpfs /dev", "devtmpfs comes first"
    assert text(entries, "etc/hostname") == "localhost\n"


def test_root_logs_in_on_ttys0_without_a_password(assembled: tuple[Entries, str]) -> None:
    entries, _ = assembled
    shadow = text(entries, "etc/shadow").splitlines()
    assert shadow[0].split(":")[:2] == ["root", ""]
    assert shadow[1:] == ["bin:!::0:::::", "nobody:!::0:::::"], "other users are kept"
    assert stat.S_IMODE(entries["etc/shadow"][0]) == 0o640
    assert text(entries, "etc/securetty").splitlines() == ["console", "tty1", "ttyS0"]


def test_kernel_modules_and_their_order(assembled: tuple[Entries, str]) -> None:
    entries, _ = assembled
    assert text(entries, "etc/phd/modules") == "virtio_ring\nvirtio_pci\nvirtio_blk\n"
    for name, data in MODULES:
        assert entries[f"{MODULE_DIR[1:]}/{name}.ko"][1] == data
    loader = entries["etc/phd/load-modules"]
    assert stat.S_IMODE(loader[0]) == 0o755
    assert 'insmod "/lib/phd-modules/$module.ko"' in loader[1].decode()
    mode, _, major, minor = entries["dev/console"]
    assert stat.S_ISCHR(mode) and (major, minor) == (5, 1)


def test_a_tarball_that_is_not_a_minirootfs_is_refused(tmp_path: Path) -> None:
    tarball = standin_minirootfs(tmp_path / "x.tar.gz", drop="etc/alpine-release")
    with pytest.raises(AssemblyError, match=r"is not an Alpine minirootfs .*lacks etc/alpine-release"):
        rootfs_archive(tarball, MODULES)
    (tmp_path / "junk.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(AssemblyError, match="is not a readable tarball"):
        rootfs_archive(tmp_path / "junk.tar.gz", MODULES)


def test_a_member_escaping_the_root_is_refused(tmp_path: Path) -> None:
    evil = tarfile.TarInfo("../../etc/passwd")
    tarball = standin_minirootfs(tmp_path / "x.tar.gz", extra=evil)
    with pytest.raises(AssemblyError, match="escapes the root"):
        rootfs_archive(tarball, MODULES)


def test_recipe_prompts_match_the_adapter_and_the_cmdline_boots_busybox_init() -> None:
    assert adapter_for("alpine") is AlpineGuest
    assert (AlpineGuest.login_prompt, AlpineGuest.shell_prompt) == (LOGIN_PROMPT, SHELL_PROMPT)
    assert LOGIN_PROMPT == "localhost login: "
    assert SHELL_PROMPT == "localhost:~# "
    assert CMDLINE.startswith("console=ttyS0 ") and "rdinit=/sbin/init" in CMDLINE.split()


# --- build.py: cache keyed by the tarball's content -------------------------------------------
KERNEL = Package("linux-image-6.1.0-56-amd64", "6.1.192-2")
STUB = Package("systemd-boot-efi", "252.39-1~deb12u2")


class FakeAssembler:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, kernel: Package, minirootfs: Path, work: Path, staging: Path, *,
                 cmdline: str, stub: Package) -> Assembled:
        self.calls += 1
        for name in ("vmlinuz", "vmlinux", "initrd.img", "boot.raw"):
            (staging / name).write_bytes(f"{name} {kernel} {minirootfs.read_bytes()!r}".encode())
        (staging / "cmdline").write_text(cmdline + "\n")
        return Assembled(kernel_version="6.1.0-56-amd64", kernel_file="vmlinux", modules=("virtio",),
                         alpine_release="3.20.3",
                         entries=3)


def resolve(path: Path) -> Inputs:
    return Inputs(KERNEL, path, hashlib.sha256(path.read_bytes()).hexdigest(), STUB)


def test_build_writes_the_interface_and_caches_by_tarball_content(tmp_path: Path) -> None:
    tarball = tmp_path / "in.tar.gz"
    tarball.write_bytes(b"release one")
    fake, out = FakeAssembler(), tmp_path / "alpine"
    first = build(out, tarball, resolve=resolve, assembler=fake)
    assert first.built
    meta = json.loads((out / "guest.json").read_text())
    assert meta["recipe"] == "alpine"
    assert (meta["login_prompt"], meta["login_user"], meta["shell_prompt"]) == (
        "localhost login: ", "root", "localhost:~# ")
    assert meta["cmdline"] == (out / "cmdline").read_text().strip() == CMDLINE
    assert meta["minirootfs_sha256"] == hashlib.sha256(b"release one").hexdigest()
    assert meta["alpine_release"] == "3.20.3"
    assert meta["sha256"]["initrd.img"] == hashlib.sha256((out / "initrd.img").read_bytes()).hexdigest()
    assert meta["files"]["firmware_disk"] == "boot.raw" and (out / "boot.raw").stat().st_mode & 0o222 == 0

    # The same bytes under another path (the store's cache vs a user's local_path): a cache hit.
    moved = tmp_path / "elsewhere.tar.gz"
    moved.write_bytes(b"release one")
    assert not build(out, moved, resolve=resolve, assembler=fake).built
    assert fake.calls == 1
    # New content: a rebuild, with a different input hash.
    tarball.write_bytes(b"release two")
    second = build(out, tarball, resolve=resolve, assembler=fake)
    assert second.built and second.metadata["input_hash"] != first.metadata["input_hash"]
    assert build(out, tarball, resolve=resolve, assembler=fake, force=True).built
    assert fake.calls == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alpine", "alpine.lock", "elsewhere.tar.gz",
                                                          "in.tar.gz"]


def test_a_failed_assembly_leaves_no_half_build(tmp_path: Path) -> None:
    tarball = standin_minirootfs(tmp_path / "in.tar.gz", drop="bin/busybox")

    def broken(kernel: Package, minirootfs: Path, work: Path, staging: Path, *, cmdline: str,
               stub: Package) -> Assembled:
        rootfs_archive(minirootfs, ())
        raise AssertionError("not reached")

    with pytest.raises(BuildError, match="lacks bin/busybox"):
        build(tmp_path / "alpine", tarball, resolve=resolve, assembler=broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alpine.lock", "in.tar.gz"]


def test_the_command_line_needs_the_minirootfs_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--out", str(tmp_path / "alpine")])
    assert exited.value.code == 2
    assert "needs --input minirootfs=PATH" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "alpine"), "--input", "kernel=/x"])
    assert "unknown --input kernel" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "alpine"), "--input", f"minirootfs={tmp_path / 'nope'}"]) == 1
    assert "alpine: error: --input minirootfs=" in capsys.readouterr().err
    assert alpine_build.RECIPE == "alpine"
