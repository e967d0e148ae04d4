"""The editor in Debian's headless Chromium (driven by Playwright's Python API with `executable_path`, no
downloaded browser) against a real `sdgraph serve` process with toy node types.

Skips only when no Chromium binary exists; under CI (the CI variable set) a missing one fails instead."""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from editor_page import ARTIFACTS, expect

WEB_NODES = Path(__file__).with_name("web_nodes.py")
TOY_NODES = Path(__file__).parents[1] / "engine" / "toy_nodes.py"
SDGRAPH = Path(sys.executable).with_name("sdgraph")


def find_chromium() -> str | None:
    for candidate in (os.environ.get("SDGRAPH_CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser"),
                      "/usr/lib/chromium/chromium"):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def chromium_path() -> str:
    path = find_chromium()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("no Chromium for the editor's end-to-end tests: apt-get install -y chromium")
        pytest.skip("no Chromium binary (apt-get install chromium, or set SDGRAPH_CHROMIUM)")
    try:
        import playwright  # noqa: F401
    except ImportError:
        pytest.fail("Chromium is here but Playwright is not: pip install playwright==1.65.2 "
                    "(never `playwright install`, which downloads a browser)")
    return path


@pytest.fixture(scope="session")
def headless_chromium(chromium_path: str) -> Iterator:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path, args=["--no-sandbox", "--disable-gpu"])
        yield browser
        browser.close()


@contextmanager
def running_server(root: Path, node_arguments: list[str]) -> Iterator[str]:
    """`sdgraph serve` on a free loopback port with its folders under `root`; yields the editor's URL."""
    port = free_port()
    log = (root / "server.log").open("wb")
    process = subprocess.Popen(
        [str(SDGRAPH), "serve", "--port", str(port), *node_arguments,
         "--models-dir", str(root / "models"), "--input-dir", str(root / "input"), "--output-dir", str(root / "output"),
         "--temp-dir", str(root / "temp"), "--database", str(root / "queue.sqlite")],
        stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(base + "/object_info", timeout=2):
                    break
            except OSError:
                assert process.poll() is None, (root / "server.log").read_text()
                assert time.monotonic() < deadline, "sdgraph serve did not answer within 90 s"
                time.sleep(0.1)
        with urllib.request.urlopen(base + "/", timeout=5) as answer:
            serves_editor = b'id="root"' in answer.read()
        # Until the server serves web/dist at `/`, the same bundle is reachable through the /web/ route.
        yield base + ("/" if serves_editor else "/web/dist/index.html")
    finally:
        process.terminate()
        process.wait(10)
        log.close()


@pytest.fixture(scope="session")
def editor_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_server(tmp_path_factory.mktemp("toy-server"),
                        ["--no-default-nodes", "--nodes", str(TOY_NODES), "--nodes", str(WEB_NODES)]) as url:
        yield url


@pytest.fixture(scope="session")
def sd_editor_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server with the built-in SD nodes (and so the built-in demo checkpoint)."""
    with running_server(tmp_path_factory.mktemp("sd-server"), []) as url:
        yield url


def open_editor(browser, url: str, request: pytest.FixtureRequest) -> Iterator:
    """A fresh browser context (empty local storage) on the editor page, failing the test on any console
    error that the test did not declare expected in `page.expected_errors` (regular expressions)."""
    context = browser.new_context(viewport={"width": 1400, "height": 900}, accept_downloads=True)
    # Generous waits: the CI machine's two cores are often busy with other suites at the same time.
    context.set_default_timeout(20_000)
    expect.set_options(timeout=15_000)
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda message: message.type == "error"
            and errors.append(f"{message.text} @ {message.location.get('url')}"))
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.expected_errors = []
    page.goto(url)
    page.wait_for_selector(".react-flow__node")
    yield page
    if getattr(request.node, "failed_call", False):
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"failed-{request.node.name}.png"))
    context.close()
    unexpected = [e for e in errors if not any(re.search(pattern, e) for pattern in page.expected_errors)]
    assert unexpected == [], f"console errors: {unexpected}"


@pytest.fixture
def editor(headless_chromium, editor_url: str, request: pytest.FixtureRequest) -> Iterator:
    yield from open_editor(headless_chromium, editor_url, request)


@pytest.fixture
def sd_editor(headless_chromium, sd_editor_url: str, request: pytest.FixtureRequest) -> Iterator:
    yield from open_editor(headless_chromium, sd_editor_url, request)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if report.when == "call" and report.failed:
        item.failed_call = True
    return report

