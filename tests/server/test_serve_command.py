"""`sdgraph serve` as a user starts it: a real process answering on loopback, the editor page at `/`."""
from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from live_server import TOY_NODES, free_port

SDGRAPH = Path(sys.executable).with_name("sdgraph")


def test_serve_answers_the_api_and_serves_the_page(tmp_path: Path) -> None:
    port = free_port()
    process = subprocess.Popen(
        [str(SDGRAPH), "serve", "--port", str(port), "--nodes", str(TOY_NODES),
         "--output-dir", str(tmp_path / "output"), "--input-dir", str(tmp_path / "input"),
         "--temp-dir", str(tmp_path / "temp"),
         "--models-dir", str(tmp_path / "models")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/object_info", timeout=2) as answer:
                    info = answer.read().decode()
                break
            except OSError:
                assert process.poll() is None, process.stdout.read().decode()
                assert time.monotonic() < deadline, "sdgraph serve did not answer within 30 s"
                time.sleep(0.2)
        assert '"Constant"' in info
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as page:
            assert page.headers["Content-Type"].startswith("text/html") and b"<title>sdgraph" in page.read()
        assert all((tmp_path / name).is_dir() for name in ("output", "input", "temp"))
    finally:
        process.terminate()
        process.wait(10)
        process.stdout.close()
