"""The committed bundle web/dist is what the sources build to, so a user without Node gets the editor
as the code describes it."""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

WEB = Path(__file__).parents[2] / "web"
DIST = WEB / "dist"


def bundle_sources() -> list[str]:
    """The same list as vite.config.ts's bundleSources: src/ without tests, fixtures and caches; lockfile, config."""
    sources = [path.relative_to(WEB).as_posix() for path in (WEB / "src").rglob("*")
               if path.is_file() and not path.name.endswith(".test.ts")
               and not {"fixtures", "node_modules"} & set(path.relative_to(WEB / "src").parts)]
    return sorted([*sources, "package-lock.json", "vite.config.ts"])


def source_hash() -> str:
    digest = hashlib.sha256()
    for name in bundle_sources():
        digest.update(name.encode() + b"\0" + (WEB / name).read_bytes() + b"\0")
    return digest.hexdigest()


def files_under(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def test_the_committed_bundle_was_built_from_the_current_sources() -> None:
    recorded = json.loads((DIST / "source-hash.json").read_text())
    assert recorded == {"sha256": source_hash(), "files": len(bundle_sources())}, \
        "web/dist is stale: run `npm ci --prefix web && npm run build --prefix web` and commit web/dist"


def test_the_page_loads_its_assets_by_relative_paths_that_exist() -> None:
    page = (DIST / "index.html").read_text()
    assets = re.findall(r'(?:src|href)="(\./assets/[^"]+)"', page)
    assert {Path(a).suffix for a in assets} == {".js", ".css"}
    assert all((DIST / asset).is_file() for asset in assets)
    assert '<link rel="icon" href="data:,">' in page  # no favicon request, no console 404


@pytest.mark.skipif(shutil.which("npm") is None or not (WEB / "node_modules").is_dir(),
                    reason="needs Node and `npm ci --prefix web` (the source hash above covers a plain checkout)")
def test_rebuilding_from_source_gives_the_committed_bundle_byte_for_byte(tmp_path: Path) -> None:
    subprocess.run(["npx", "vite", "build", "--outDir", str(tmp_path / "dist"), "--emptyOutDir", "--logLevel", "error"],
                   cwd=WEB, check=True, timeout=120)
    built = files_under(tmp_path / "dist")
    committed = files_under(DIST)
    assert built.keys() == committed.keys()
    assert [name for name in built if built[name] != committed[name]] == []
