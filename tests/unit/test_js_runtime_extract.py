"""scripts/js_runtime.py unpacks npm tarballs on every supported Python, and never outside
its folder: 3.11.4+ through tarfile's extraction filters, Debian bookworm's 3.11.2 (no
filters) through the script's own check."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import tarfile
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "js_runtime.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("js_runtime", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


js_runtime = _load()


def _tarball(*members: tuple[str, str, bytes | str]) -> tarfile.TarFile:
    """(kind, name, data or link target) -> an open archive; kind is file, symlink or hardlink."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for kind, name, payload in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                assert isinstance(payload, bytes)
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))
                continue
            info.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
            assert isinstance(payload, str)
            info.linkname = payload
            archive.addfile(info)
    buffer.seek(0)
    return tarfile.open(fileobj=buffer, mode="r:gz")


NPM_LIKE = (
    ("file", "package/bin/node", b"#!binary"),
    ("symlink", "package/bin/npm", "../lib/npm-cli.js"),
    ("file", "package/lib/npm-cli.js", b"// cli"),
)


@pytest.fixture(params=["with filters", "without filters (Python < 3.11.4)"])
def python_flavour(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param.startswith("without"):
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    return str(request.param)


def test_an_npm_package_unpacks(tmp_path: Path, python_flavour: str) -> None:
    with _tarball(*NPM_LIKE) as archive:
        js_runtime.extract(archive, tmp_path)
    assert (tmp_path / "package/bin/node").read_bytes() == b"#!binary"
    assert (tmp_path / "package/bin/npm").read_text() == "// cli"


@pytest.mark.parametrize(
    "member",
    [
        ("file", "../escaped", b"x"),
        ("symlink", "package/evil", "../../escaped"),
        ("symlink", "package/evil", "/etc/passwd"),
        ("hardlink", "package/evil", "../escaped"),
    ],
)
def test_members_that_leave_the_folder_are_refused(
    tmp_path: Path, python_flavour: str, member: tuple[str, str, bytes | str]
) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    with _tarball(member) as archive, pytest.raises((SystemExit, tarfile.FilterError)):
        js_runtime.extract(archive, dest)
    assert [p.name for p in tmp_path.iterdir()] == ["dest"]


def test_an_absolute_name_does_not_land_outside(tmp_path: Path, python_flavour: str) -> None:
    # The filter unpacks it under dest with the leading slash stripped; the fallback refuses it.
    dest, outside = tmp_path / "dest", tmp_path / "absolute-escape"
    dest.mkdir()
    with _tarball(("file", str(outside), b"x")) as archive, contextlib.suppress(SystemExit):
        js_runtime.extract(archive, dest)
    assert not outside.exists()
