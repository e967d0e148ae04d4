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


def wait_for_server(process: subprocess.Popen, port: int) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/queue", timeout=2):
                return
        except OSError:
            assert process.poll() is None, process.stdout.read().decode()
            assert time.monotonic() < deadline, "the server did not answer within 30 s"
            time.sleep(0.1)


def test_python_server_py_listening_on_every_address_warns_and_serves(tmp_path: Path) -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(Path(__file__).parents[2] / "server.py"), "--listen", "0.0.0.0", "--port", str(port),
         "--no-default-nodes", "--nodes", str(TOY_NODES), "--output-dir", str(tmp_path / "output"),
         "--input-dir", str(tmp_path / "input"), "--temp-dir", str(tmp_path / "temp")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for_server(process, port)
    finally:
        process.terminate()
        output = process.communicate(timeout=20)[0].decode()
    assert process.returncode == 0
    assert "sdgraph: warning: listening on 0.0.0.0: every machine that reaches this one can queue prompts" in output
    assert "set --auth-token" in output


def test_serve_options_reach_the_settings_and_the_server(monkeypatch, tmp_path: Path) -> None:
    import types

    import cli
    calls = []
    fake = types.ModuleType("server")
    fake.serve = lambda settings, **options: calls.append((settings, options))
    monkeypatch.setitem(sys.modules, "server", fake)
    monkeypatch.setenv("SDGRAPH_AUTH_TOKEN", "from-env")
    assert cli.main(["serve", "--no-default-nodes", "--listen", "0.0.0.0", "--port", "9001",
                     "--models-dir", str(tmp_path / "a"), "--models-dir", str(tmp_path / "b"),
                     "--preview", "none", "--cache-size", "2G", "--database", str(tmp_path / "q.db")]) == 0
    settings, options = calls[0]
    assert (settings.models_dir, settings.extra_models_dirs, settings.preview) == (tmp_path / "a", (tmp_path / "b",),
                                                                                    "none")
    assert (options["host"], options["port"], options["database"], options["auth_token"]) == (
        "0.0.0.0", 9001, tmp_path / "q.db", "from-env")
    assert options["executor"].cache.max_bytes == 2 * 2**30


def test_cache_sizes_read_as_binary_units_and_zero_turns_caching_off() -> None:
    import pytest

    import cli
    assert cli.cache_of_size("512M").max_bytes == 512 * 2**20
    assert cli.cache_of_size("1.5GiB").max_bytes == int(1.5 * 2**30)
    assert cli.cache_of_size("0").max_entries == 0
    with pytest.raises(cli.UsageError, match="expected a size such as 8G"):
        cli.cache_of_size("lots")
    for endless in ("nan", "inf", "-1G"):
        with pytest.raises(cli.UsageError, match="must be a finite size, not negative"):
            cli.cache_of_size(endless)


def test_run_and_validate_take_every_models_dir_too(tmp_path: Path) -> None:
    import cli
    for command in ("run", "validate"):
        args = cli.build_parser().parse_args([command, "workflow.json", "--models-dir", str(tmp_path / "first"),
                                              "--models-dir", str(tmp_path / "second")])
        settings = cli.settings_from(args)
        assert settings.model_roots == (tmp_path / "first", tmp_path / "second")
