"""guests/debian without mmdebstrap: argv, configuration of a fake tree, driver checks, and
the cache/lock/replace protocol with a fake assembler (the real build is an integration test)."""

from __future__ import annotations

import json
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from guests.common.debian import DebianError, Package
from guests.debian import build as debian_build
from guests.debian.assemble import (
    MASKED_UNITS,
    Assembled,
    apt_sources,
    check_drivers,
    customize,
    empty_root_password,
    mke2fs_argv,
    mmdebstrap_argv,
    parse_kernel_config,
)
from guests.debian.build import BuildError, build, main, split_policy

PACKAGES = (Package("systemd-sysv", "252.39-1~deb12u2"),
            Package("linux-image-6.1.0-56-cloud-amd64", "6.1.192-2"))


def test_mmdebstrap_pins_every_version_and_uses_the_host_sources(tmp_path: Path) -> None:
    sources = [tmp_path / "debian.sources"]
    argv = mmdebstrap_argv(PACKAGES, tmp_path / "root", sources)
    assert argv[:4] == ["mmdebstrap", "--mode=root", "--variant=minbase", "--format=directory"]
    assert "--include=systemd-sysv=252.39-1~deb12u2,linux-image-6.1.0-56-cloud-amd64=6.1.192-2" in argv
    assert argv[-3:] == ["bookworm", str(tmp_path / "root"), str(sources[0])]
    uploads = [a.split()[1] for a in argv if a.startswith("--essential-hook=upload ")]
    assert len(uploads) == 2 and all(Path(u).is_file() for u in uploads), uploads


def test_apt_sources_finds_enabled_files_only(tmp_path: Path) -> None:
    (tmp_path / "sources.list").write_text("# only comments\n")
    parts = tmp_path / "sources.list.d"
    parts.mkdir()
    for name in ("debian.sources", "extra.list", "old.list.disabled-by-farm"):
        (parts / name).write_text("x\n")
    assert apt_sources(tmp_path) == [parts / "debian.sources", parts / "extra.list"]
    (tmp_path / "sources.list").write_text("deb http://deb.debian.org/debian bookworm main\n")
    assert apt_sources(tmp_path)[0] == tmp_path / "sources.list"


def test_mke2fs_needs_no_mount() -> None:
    assert mke2fs_argv(Path("/r"), Path("/o/disk.raw"), 2 << 30, 25 << 20) == [
        "mke2fs", "-q", "-F", "-t", "ext4", "-L", "root", "-E", f"offset={25 << 20}", "-d", "/r",
        "/o/disk.raw", "2097152k"]


def test_empty_root_password_touches_only_root() -> None:
    shadow = "root:*:20782:0:99999:7:::\ndaemon:*:20782:0:99999:7:::\n"
    assert empty_root_password(shadow) == "root::20782:0:99999:7:::\ndaemon:*:20782:0:99999:7:::\n"
    with pytest.raises(DebianError, match="no root entry"):
        empty_root_password("daemon:*:1:0:99999:7:::\n")


def _fake_tree(root: Path) -> None:
    (root / "etc" / "systemd" / "system" / "getty.target.wants").mkdir(parents=True)
    (root / "etc" / "systemd" / "system" / "getty.target.wants" / "getty@tty1.service").symlink_to(
        "/lib/systemd/system/getty@.service")
    (root / "etc" / "shadow").write_text("root:*:20782:0:99999:7:::\n")
    (root / "etc" / "hostname").write_text("buildhost\n")
    (root / "etc" / "resolv.conf").write_text("nameserver 127.0.0.53\n")
    (root / "etc" / "machine-id").write_text("0123\n")


def test_customize_configures_the_tree(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _fake_tree(root)
    customize(root)
    etc = root / "etc"
    assert (etc / "hostname").read_text() == "debian\n"
    assert "127.0.1.1\tdebian" in (etc / "hosts").read_text()
    assert "/dev/vda2\t/\text4" in (etc / "fstab").read_text()
    assert "nameserver" not in (etc / "resolv.conf").read_text(), "the build host's resolver leaked"
    assert "DHCP=ipv4" in (etc / "systemd" / "network" / "10-phd-dhcp.network").read_text()
    assert (etc / "shadow").read_text().startswith("root::")
    assert (etc / "machine-id").read_text() == ""
    units = etc / "systemd" / "system"
    for unit in MASKED_UNITS:
        assert str((units / unit).readlink()) == "/dev/null"
    assert not (units / "getty.target.wants" / "getty@tty1.service").is_symlink()
    assert str((units / "multi-user.target.wants" / "systemd-networkd.service").readlink()) == (
        "/lib/systemd/system/systemd-networkd.service")
    assert stat.S_IMODE((etc / "hostname").stat().st_mode) == 0o644
    customize(root)  # idempotent: a second pass changes nothing and does not fail


CONFIG = "CONFIG_VIRTIO_PCI=m\nCONFIG_VIRTIO_BLK=m\nCONFIG_EXT4_FS=y\nCONFIG_VIRTIO_NET=m\n" \
         "CONFIG_BLK_DEV_NVME=y\n# CONFIG_FOO is not set\n"


def test_drivers_are_located() -> None:
    config = parse_kernel_config(CONFIG)
    assert "CONFIG_FOO" not in config
    assert check_drivers(config, {"virtio_pci", "virtio_blk"}) == {
        "virtio_pci": "initrd", "virtio_blk": "initrd", "ext4": "builtin",
        "virtio_net": "module", "nvme": "builtin"}


def test_root_disk_driver_missing_from_the_initrd_fails() -> None:
    with pytest.raises(DebianError, match="cannot boot from vda: virtio_blk is neither built in nor in"):
        check_drivers(parse_kernel_config(CONFIG), {"virtio_pci"})


def test_missing_nvme_fails() -> None:
    config = parse_kernel_config(CONFIG.replace("CONFIG_BLK_DEV_NVME=y\n", ""))
    with pytest.raises(DebianError, match="cannot drive nvme"):
        check_drivers(config, {"virtio_pci", "virtio_blk"})


def test_split_policy() -> None:
    text = "udev:\n  Installed: (none)\n  Candidate: 252.39\n  Version table:\n" \
           "procps:\n  Installed: 2:4.0.2-3\n  Candidate: 2:4.0.2-3\n"
    sections = split_policy(text)
    assert sorted(sections) == ["procps", "udev"]
    assert "Candidate: 252.39" in sections["udev"] and "4.0.2" not in sections["udev"]


# --- the cache protocol, with a fake assembler -------------------------------------------------
class FakeAssembler:
    def __init__(self, error: Exception | None = None) -> None:
        self.calls = 0
        self.error = error

    def __call__(self, packages: Sequence[Package], work: Path, staging: Path, *, cmdline: str) -> Assembled:
        self.calls += 1
        if self.error is not None:
            (staging / "disk.raw").write_bytes(b"half")
            raise self.error
        for name in ("vmlinuz", "initrd.img"):
            (staging / name).write_bytes(name.encode())
        with (staging / "disk.raw").open("wb") as f:
            f.truncate(1 << 20)
        (staging / "cmdline").write_text(cmdline + "\n")
        # a kernel without a PVH note: direct kernel boot falls back to the bzImage
        return Assembled("6.1.0-56-cloud-amd64", "vmlinuz", {"udev": "252"}, {"virtio_blk": "initrd"})


def run(out: Path, fake: FakeAssembler, packages: Sequence[Package] = PACKAGES,
        **kw: Any) -> debian_build.BuildResult:
    return build(out, resolve=lambda: packages, assembler=fake, need_root=False, **kw)


def test_first_build_writes_the_recipe_interface(tmp_path: Path) -> None:
    out = tmp_path / "debian"
    assert run(out, FakeAssembler()).built
    assert sorted(p.name for p in out.iterdir()) == [
        "cmdline", "disk.raw", "guest.json", "initrd.img", "vmlinuz"]
    meta = json.loads((out / "guest.json").read_text())
    assert meta["files"]["kernel"] == "vmlinuz", "no PVH ELF: direct kernel boot loads the bzImage"
    assert (meta["login_prompt"], meta["login_user"], meta["shell_prompt"]) == (
        "debian login: ", "root", "root@debian:~# ")
    assert meta["files"]["disk"] == "disk.raw" and meta["cmdline"] == (out / "cmdline").read_text().strip()
    assert meta["cmdline"].startswith("console=ttyS0 root=/dev/vda2 rw")
    assert meta["files"]["firmware_disk"] == "disk.raw"
    assert set(meta["sha256"]) == {"vmlinuz", "initrd.img", "disk.raw"}
    assert meta["inputs"] == {p.name: p.version for p in PACKAGES}
    assert stat.S_IMODE((out / "disk.raw").stat().st_mode) == 0o444
    assert sorted(p.name for p in tmp_path.iterdir()) == ["debian", "debian.lock"]


def test_second_build_is_a_cache_hit_and_new_versions_rebuild(tmp_path: Path) -> None:
    fake = FakeAssembler()
    out = tmp_path / "debian"
    first = run(out, fake).metadata["input_hash"]
    assert not run(out, fake).built
    assert fake.calls == 1
    newer = (PACKAGES[0], Package(PACKAGES[1].name, "6.1.200-1"))
    assert run(out, fake, newer).metadata["input_hash"] != first
    assert run(out, fake, newer, force=True).built
    assert fake.calls == 3


def test_failed_build_leaves_nothing_and_keeps_the_old_result(tmp_path: Path) -> None:
    out = tmp_path / "debian"
    run(out, FakeAssembler())
    before = (out / "guest.json").read_text()
    with pytest.raises(BuildError, match="mirror down"):
        run(out, FakeAssembler(DebianError("mirror down")), force=True)
    assert (out / "guest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["debian", "debian.lock"]


def test_a_foreign_directory_is_never_replaced(tmp_path: Path) -> None:
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep")
    with pytest.raises(BuildError, match="refusing to replace it"):
        run(tmp_path / "precious", FakeAssembler())
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep"


def test_cli_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    def fail() -> tuple[Package, ...]:
        raise DebianError("apt-cache policy udev exited with 100: E: no lists\nhint: run 'apt-get update'")

    monkeypatch.setattr(debian_build, "resolve_inputs", fail)
    assert main(["--out", str(tmp_path / "debian")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("debian: error: cannot resolve package versions")
    assert "run 'apt-get update'" in err


def test_recipe_digest_covers_what_shapes_the_image_only(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe"
    for name in ("build", "build.py", "assemble.py", "rootfs/etc/hostname", "initramfs/modules",
                 "README.md"):
        (recipe / name).parent.mkdir(parents=True, exist_ok=True)
        (recipe / name).write_text(name)
    first = debian_build.recipe_files_digest(recipe)
    (recipe / "README.md").write_text("edited docs")
    assert debian_build.recipe_files_digest(recipe) == first
    (recipe / "rootfs" / "etc" / "hostname").write_text("other\n")
    assert debian_build.recipe_files_digest(recipe) != first
