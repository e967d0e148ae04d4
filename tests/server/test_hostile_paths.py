"""Names that try to leave the input, output and temp folders through /view and uploads: every one refused
(or kept inside), none ever reads or writes a byte outside."""
from __future__ import annotations

import asyncio
from typing import Iterator

import aiohttp
import pytest
from yarl import URL

from live_server import LiveServer, launch, png_bytes

SECRET = b"\x89PNG secret outside the folders"

# (raw query string, the answer it must get): 403 refused, 404 stays inside and finds nothing, 400 malformed
VIEW_PROBES = [
    ("filename=../secret.png", 403),
    ("filename=..%2Fsecret.png", 403),
    ("filename=%2e%2e%2fsecret.png", 403),
    ("filename=%2E%2E/secret.png", 403),
    ("filename=/etc/passwd", 403),
    ("filename=%2Fetc%2Fpasswd", 403),
    ("filename=secret.png&subfolder=..", 403),
    ("filename=secret.png&subfolder=../", 403),
    ("filename=secret.png&subfolder=%2e%2e", 403),
    ("filename=secret.png&subfolder=/", 403),
    ("filename=secret.png&subfolder=a/../..", 403),
    ("filename=link.png", 403),  # a symlink inside pointing outside
    ("filename=secret.png&subfolder=linkdir", 403),  # a symlinked folder pointing outside
    ("filename=..%5Csecret.png", 403),
    ("filename=..\\secret.png", 403),
    ("filename=C:\\Windows\\win.ini", 403),
    ("filename=C:secret.png", 403),
    ("filename=secret.png&subfolder=%5C%5Cserver%5Cshare", 403),
    ("filename=inside.png%00.txt", 403),
    ("filename=secret.png&type=../output", 403),
    ("filename=secret.png&type=models", 403),
    ("filename=.sdgraph-queue.sqlite3", 403),  # hidden files, the queue's database among them
    ("filename=inside.png&subfolder=.git", 403),
    ("filename=%252e%252e%252fsecret.png", 404),  # double-encoded: a literal odd name inside
    ("filename=....//secret.png", 403),  # a name of dots is hidden too
    ("filename=~/secret.png", 404),
    ("filename=", 400),
    ("subfolder=..", 400),
]


@pytest.fixture(scope="module")
def hostile_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One server for every probe (none of them may change anything outside; the upload test cleans up)."""
    live_server, stop = launch(tmp_path_factory.mktemp("hostile"))
    root = live_server.settings.output_dir.parent
    (root / "secret.png").write_bytes(SECRET)
    output = live_server.settings.output_dir
    (output / "inside.png").write_bytes(png_bytes())
    (output / "link.png").symlink_to(root / "secret.png")
    (output / "linkdir").symlink_to(root, target_is_directory=True)
    (live_server.settings.input_dir / "linkdir").symlink_to(root, target_is_directory=True)
    yield live_server
    stop()


def test_there_are_at_least_twenty_probes() -> None:
    assert len(VIEW_PROBES) >= 20


@pytest.mark.parametrize("query, expected", VIEW_PROBES, ids=[query for query, _ in VIEW_PROBES])
def test_view_refuses_names_outside_its_folders(hostile_server: LiveServer, query: str, expected: int) -> None:
    async def fetch() -> tuple[int, bytes]:
        async with aiohttp.ClientSession() as session:
            async with session.get(URL(f"{hostile_server.url}/view?{query}", encoded=True)) as answer:
                return answer.status, await answer.read()
    status, body = asyncio.run(fetch())
    assert status == expected
    assert SECRET not in body


def multipart(filename: str, content: bytes, **fields: str) -> tuple[bytes, str]:
    """A multipart body written by hand, so the file name reaches the server byte for byte (aiohttp's
    client would percent-encode it)."""
    boundary = "sdgraphboundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
             for name, value in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
                 f"Content-Type: image/png\r\n\r\n".encode("utf-8", "surrogateescape") + content + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


# (file name, extra fields, the answer): 200 only where the file stays inside under a plain name. aiohttp
# reads a backslash in the quoted file name as an escape: `..\..\evil.png` arrives as `....evil.png`.
UPLOAD_PROBES = [
    ("../../evil.png", {}, 200),
    ("..\\..\\evil.png", {}, 400),
    ("/etc/evil.png", {}, 200),
    ("C:\\Windows\\evil.png", {}, 403),
    ("..%2F..%2Fevil.png", {}, 200),
    (".hidden.png", {}, 400),
    ("..", {}, 400),
    ("evil.html", {}, 400),
    ("evil.png\x01", {}, 400),
    ("evil.png", {"subfolder": "../.."}, 403),
    ("evil.png", {"subfolder": "/tmp"}, 403),
    ("evil.png", {"subfolder": "..\\.."}, 403),
    ("evil.png", {"subfolder": "C:\\temp"}, 403),
    ("evil.png", {"subfolder": "linkdir"}, 403),
    ("evil.png", {"subfolder": "a/../../.."}, 403),
    ("evil.png", {"type": "../input"}, 403),
    ("evil.png", {"subfolder": ".git"}, 403),
]


@pytest.mark.parametrize("filename, fields, expected", UPLOAD_PROBES, ids=[f"{n}|{f}" for n, f, _ in UPLOAD_PROBES])
def test_uploads_never_write_outside_the_input_folder(hostile_server: LiveServer, filename: str,
                                                      fields: dict[str, str], expected: int) -> None:
    body, content_type = multipart(filename, png_bytes((1, 2, 3)), **fields)

    async def send() -> tuple[int, str]:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{hostile_server.url}/upload/image", data=body,
                                    headers={"Content-Type": content_type}) as answer:
                return answer.status, await answer.text()
    status, text = asyncio.run(send())
    assert status == expected, text
    root = hostile_server.settings.output_dir.parent
    inputs = hostile_server.settings.input_dir.resolve()
    written = [path for path in root.rglob("*evil*") if path.is_file()]
    assert all(inputs in path.resolve().parents for path in written)
    if expected == 200:
        assert [path.name for path in written] == ["evil.png"]
        assert (hostile_server.settings.input_dir / "evil.png").is_file()
    for path in written:
        path.unlink()
