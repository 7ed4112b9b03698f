"""The image builder's pure parts: which packages and libraries a binary needs, and tags."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from sut.storage.image import build
from sut.storage.image.build import BinaryRuntime, ImageBuildError, binary_image_tag, binary_runtime

LDD = """\tlinux-vdso.so.1 (0x00007ffd)
\tlibsqlite3.so.0 => /lib/x86_64-linux-gnu/libsqlite3.so.0 (0x00007f88)
\tlibodd.so.2 => /opt/odd/lib/libodd.so.2 (0x00007f89)
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f8a)
\t/lib64/ld-linux-x86-64.so.2 (0x00007f8b)
"""


def fake_ldd(text: str) -> object:
    def ldd(_binary: Path) -> list[tuple[str, str]]:
        out = []
        for line in text.splitlines():
            match = build._LDD_LINE.match(line)
            assert match is not None, line
            name, path = match.group(1) or match.group(2), match.group(2)
            if "vdso" not in name:
                out.append((name, path))
        return out
    return ldd


def test_packaged_libraries_become_packages_and_the_rest_is_copied(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build, "_ldd", fake_ldd(LDD))
    owners = {"libsqlite3.so.0": "libsqlite3-0", "libc.so.6": "libc6", "ld-linux-x86-64.so.2": "libc6"}
    monkeypatch.setattr(build, "_package_of", lambda path: owners.get(path.name))
    runtime = binary_runtime(Path("/bin/true"))
    assert runtime.packages == ("ca-certificates", "libc6", "libsqlite3-0")
    assert runtime.copied == (Path("/opt/odd/lib/libodd.so.2"),)


def test_a_library_missing_here_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build, "_ldd", fake_ldd("\tlibgone.so.1 => not found\n"))
    with pytest.raises(ImageBuildError, match=r"needs libgone\.so\.1, which is not installed here"):
        binary_runtime(Path("/bin/true"))


@pytest.mark.skipif(shutil.which("dpkg") is None or shutil.which("ldd") is None,
                    reason="needs a Debian host (dpkg, ldd)")
def test_a_real_binary_needs_only_packages() -> None:
    runtime = binary_runtime(Path(shutil.which("true") or "/bin/true"))
    assert "libc6" in runtime.packages and runtime.copied == ()


def test_the_tag_starts_with_the_binarys_sha256_and_follows_the_recipe(tmp_path: Path) -> None:
    binary = tmp_path / "crucible-downstairs"
    binary.write_bytes(b"\x7fELF fake")
    sha = hashlib.sha256(binary.read_bytes()).hexdigest()
    one = binary_image_tag(binary, BinaryRuntime(("libc6",), ()))
    assert one.startswith(f"phd-downstairs-bin:{sha[:16]}-")
    assert binary_image_tag(binary, BinaryRuntime(("libc6",), ())) == one
    assert binary_image_tag(binary, BinaryRuntime(("libc6", "libsqlite3-0"), ())) != one
    binary.write_bytes(b"\x7fELF other")
    assert binary_image_tag(binary, BinaryRuntime(("libc6",), ())).split(":")[1][:16] != sha[:16]


def test_our_program_is_phd_downstairs_with_its_import_closure() -> None:
    assert build.PROGRAMS == ("ours",)
    tag = build.image_tag()
    assert tag.startswith("phd-downstairs:") and tag == build.image_tag("ours")
    sources = build.downstairs_sources()
    root = Path(build.__file__).resolve().parents[3]
    names = {str(p.relative_to(root)) for p in sources}
    # the downstairs, the wire codec it speaks, and every package init on the way
    assert {"sut/__init__.py", "sut/storage/__init__.py", "sut/storage/downstairs.py",
            "sut/storage/wire/__init__.py", "sut/storage/wire/messages.py",
            "sut/storage/extent_raw.py"} <= names, sorted(names)
    assert "sut/storage/image/build.py" not in names
    for gone in ("legacy", "ours13", "cobol"):
        with pytest.raises(ImageBuildError, match=f"unknown downstairs program '{gone}'"):
            build.image_tag(gone)


def test_one_dockerfile_for_ours_running_the_downstairs() -> None:
    here = Path(build.__file__).resolve().parent
    assert sorted(p.name for p in here.glob("Dockerfile*")) == ["Dockerfile", "Dockerfile.binary"]
    dockerfile = (here / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["python3", "-m", "sut.storage.downstairs"]' in dockerfile
    assert build._RECIPES["ours"].packages == ("python3", "python3-xxhash")
    assert build._RECIPES["ours"].dockerfile == "Dockerfile"


def test_the_tag_follows_the_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hash covers the downstairs' import closure: a changed source file is a new tag."""
    before = build.image_tag()
    sources = build.downstairs_sources()
    copy = tmp_path / "copy.py"
    copy.write_bytes(sources[-1].read_bytes() + b"\n# changed\n")
    original = Path.read_bytes

    def read_bytes(path: Path) -> bytes:
        return original(copy) if path == sources[-1] else original(path)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    assert build.image_tag() != before
