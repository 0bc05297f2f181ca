#!/usr/bin/env python3
"""Make sure Reflex has Node.js >= 22.22 and bun >= 1.4.4; print the PATH entries to use.

Reflex's own installers download from outside the package registries, which fails behind a
proxy. Both runtimes are published on the npm registry as ordinary packages, so:

1. reuse a suitable node / bun already on PATH;
2. else reuse what an earlier run put in .tools/;
3. else install them into .tools/ with npm, or, when there is no npm at all, fetch the
   tarballs straight from the npm registry (checking their sha512 integrity).

Standard library only: this runs before the virtualenv exists. Messages go to stderr; stdout
is only the colon-separated directories to put first on PATH (empty when PATH already works).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / ".tools"
NODE_MIN = (22, 22, 0)
BUN_MIN = (1, 4, 4)
NODE_SPEC = "22"  # newest 22.x
BUN_VERSION = "1.4.5"


def say(message: str) -> None:
    print(f"[js-runtime] {message}", file=sys.stderr)


def version_of(binary: str | Path) -> tuple[int, ...] | None:
    try:
        out = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"(\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(x) for x in match.groups()) if match else None


def good(binary: str | Path | None, minimum: tuple[int, ...]) -> bool:
    if not binary:
        return False
    found = version_of(binary)
    return found is not None and found >= minimum


def node_package() -> str:
    system = {"Linux": "linux", "Darwin": "darwin"}.get(platform.system())
    machine = {"x86_64": "x64", "amd64": "x64", "aarch64": "arm64", "arm64": "arm64"}.get(
        platform.machine().lower()
    )
    if not system or not machine:
        raise SystemExit(f"no Node.js package on npm for {platform.system()} {platform.machine()}")
    return f"node-{system}-{machine}"


def bun_platform_package() -> str:
    system = {"Linux": "linux", "Darwin": "darwin"}[platform.system()]
    machine = {"x86_64": "x64", "amd64": "x64", "aarch64": "aarch64", "arm64": "aarch64"}[
        platform.machine().lower()
    ]
    name = f"@oven/bun-{system}-{machine}"
    if machine == "x64" and system == "linux":
        cpuinfo = Path("/proc/cpuinfo")
        if cpuinfo.exists() and " avx2" not in cpuinfo.read_text():
            name += "-baseline"
    return name


# Where each layout keeps the binaries.
def local_candidates() -> tuple[list[Path], list[Path]]:
    nm = TOOLS / "node_modules"
    nodes = [nm / node_package() / "bin" / "node", TOOLS / "direct" / "node" / "bin" / "node"]
    buns = [nm / ".bin" / "bun", TOOLS / "direct" / "bun" / "bin" / "bun"]
    return nodes, buns


def registry() -> str:
    # npm reads either spelling; so do we.
    url = os.environ.get("NPM_CONFIG_REGISTRY") or os.environ.get("npm_config_registry")  # noqa: SIM112
    return (url or "https://registry.npmjs.org/").rstrip("/") + "/"


def fetch_json(url: str) -> dict:
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)


def pick_version(packument: dict, spec: str) -> str:
    if spec in packument["versions"]:
        return spec
    major = int(spec)
    candidates = [
        tuple(int(x) for x in v.split("."))
        for v in packument["versions"]
        if re.fullmatch(r"\d+\.\d+\.\d+", v) and int(v.split(".")[0]) == major
    ]
    if not candidates:
        raise SystemExit(f"no version {spec}.x of {packument['name']} on {registry()}")
    return ".".join(str(x) for x in max(candidates))


def extract(archive: tarfile.TarFile, dest: Path) -> None:
    """Unpack into dest, refusing members and links that would land outside it, and devices.

    Python 3.11.4+ does that with the "data" extraction filter. Debian bookworm's python3 is
    3.11.2, which has no filters (`extractall(filter=...)` is a TypeError there), so the same
    is checked by hand.
    """
    if hasattr(tarfile, "data_filter"):
        archive.extractall(dest, filter="data")
        return
    root = dest.resolve()
    for member in archive.getmembers():
        target = (root / member.name).resolve()
        if member.issym():
            linked = (target.parent / member.linkname).resolve()
        elif member.islnk():
            linked = (root / member.linkname).resolve()
        else:
            linked = target
        if member.isdev() or not (target.is_relative_to(root) and linked.is_relative_to(root)):
            raise SystemExit(f"refusing to unpack {member.name!r}: it leaves {dest}")
    archive.extractall(dest)  # noqa: S202 - every member checked above


def fetch_package(name: str, spec: str, dest: Path) -> None:
    """Download one package tarball from the registry, check its integrity, unpack it."""
    packument = fetch_json(registry() + name.replace("/", "%2f"))
    version = pick_version(packument, spec)
    dist = packument["versions"][version]["dist"]
    say(f"downloading {name}@{version} from {registry()}")
    with urllib.request.urlopen(dist["tarball"], timeout=600) as response:
        data = response.read()
    algorithm, _, expected = dist["integrity"].partition("-")
    digest = base64.b64encode(hashlib.new(algorithm, data).digest()).decode()
    if digest != expected:
        raise SystemExit(f"integrity check failed for {name}@{version}")
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        extract(archive, dest)
    # npm tarballs keep everything under package/
    inner = dest / "package"
    for item in inner.iterdir():
        item.rename(dest / item.name)
    inner.rmdir()


def install(use_npm: bool) -> None:
    TOOLS.mkdir(exist_ok=True)
    npm = shutil.which("npm") if use_npm else None
    if npm:
        say(f"installing Node.js {NODE_SPEC}.x and bun {BUN_VERSION} from the npm registry")
        subprocess.run(
            [
                npm, "install", "--prefix", str(TOOLS), "--no-save", "--no-audit", "--no-fund",
                "--loglevel=error", f"{node_package()}@{NODE_SPEC}", f"bun@{BUN_VERSION}",
            ],
            check=True,
            stdout=sys.stderr,
        )  # fmt: skip
        return
    say("npm not found: fetching the packages from the registry directly")
    fetch_package(node_package(), NODE_SPEC, TOOLS / "direct" / "node")
    fetch_package(bun_platform_package(), BUN_VERSION, TOOLS / "direct" / "bun")
    for binary in (
        TOOLS / "direct" / "node" / "bin" / "node",
        TOOLS / "direct" / "bun" / "bin" / "bun",
    ):
        binary.chmod(0o755)


def resolve(use_npm: bool = True) -> list[Path]:
    node_ok = good(shutil.which("node"), NODE_MIN)
    bun_ok = good(shutil.which("bun"), BUN_MIN)
    extra: list[Path] = []
    for attempt in range(2):
        nodes, buns = local_candidates()
        node = node_ok or next((p for p in nodes if p.exists() and good(p, NODE_MIN)), None)
        bun = bun_ok or next((p for p in buns if p.exists() and good(p, BUN_MIN)), None)
        if node and bun:
            for found in (node, bun):
                if isinstance(found, Path) and found.parent not in extra:
                    extra.append(found.parent)
            return extra
        if attempt == 0:
            install(use_npm)
    raise SystemExit(
        'could not provide Node.js >= 22.22 and bun >= 1.4.4; see the README, "The two commands"'
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-npm", action="store_true", help="fetch tarballs without npm")
    args = parser.parse_args()
    dirs = resolve(use_npm=not args.no_npm)
    print(":".join(str(d) for d in dirs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
