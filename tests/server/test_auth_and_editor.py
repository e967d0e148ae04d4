"""The optional auth token on every route, and the editor page: the built one when it exists, else the
API console with a note on building it."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import aiohttp

from engine.client import Client
from live_server import LiveServer, get_json, post_json, run, toy_prompt

TOKEN = "s3cret-token"


def test_without_the_token_every_route_answers_401(start_server: Callable[..., LiveServer]) -> None:
    server = start_server(auth_token=TOKEN)
    for path in ("/object_info", "/queue", "/history", "/system_stats", "/view?filename=x.png", "/", "/api/prompt"):
        status, answer = run(get_json(server, path))
        assert status == 401, path
        assert answer["error"]["type"] == "unauthorized"
    assert run(post_json(server, "/prompt", {"prompt": toy_prompt()}))[0] == 401
    assert run(get_json(server, "/queue", Authorization="Bearer wrong"))[0] == 401


def test_a_bearer_token_opens_every_route(start_server: Callable[..., LiveServer]) -> None:
    server = start_server(auth_token=TOKEN)
    assert run(get_json(server, "/queue", Authorization=f"Bearer {TOKEN}"))[0] == 200
    status, _ = run(post_json(server, "/prompt", {"prompt": toy_prompt()}, Authorization=f"Bearer {TOKEN}"))
    assert status == 200


def test_the_token_in_the_query_opens_only_what_browsers_open_directly(start_server: Callable[..., LiveServer]) -> None:
    server = start_server(auth_token=TOKEN)
    (server.settings.output_dir / "a.png").write_bytes(b"\x89PNG fake")
    assert run(fetch(server, f"/view?filename=a.png&token={TOKEN}"))[0] == 200
    assert run(fetch(server, f"/queue?token={TOKEN}"))[0] == 401

    async def socket_greeting(query: str) -> str:
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{server.url}/ws?clientId=me{query}") as socket:
                return json.loads((await socket.receive(5)).data)["type"]
    assert run(socket_greeting(f"&token={TOKEN}")) == "status"
    try:
        run(socket_greeting(""))
        refused = False
    except aiohttp.WSServerHandshakeError as problem:
        refused = problem.status == 401
    assert refused


def test_opening_the_page_with_the_token_lets_its_own_requests_through(start_server: Callable[..., LiveServer]) -> None:
    server = start_server(auth_token=TOKEN)

    async def scenario() -> tuple[str, int]:
        # Keeps cookies as a browser does (`unsafe`: aiohttp's jar otherwise ignores cookies from IP addresses).
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
            async with browser.get(f"{server.url}/?token={TOKEN}") as page:
                cookie = page.headers["Set-Cookie"]
            async with browser.get(f"{server.url}/api/object_info") as info:
                return cookie, info.status
    cookie, status = run(scenario())
    assert "sdgraph_token=" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert status == 200


def test_the_client_sends_its_token(start_server: Callable[..., LiveServer]) -> None:
    server = start_server(auth_token=TOKEN)
    with Client(server.url, token=TOKEN) as client:
        assert client.wait(client.submit(toy_prompt(1)), timeout=10)["outputs"] == {"3": {"value": [4]}}


def make_web_root(root: Path, built: bool) -> Path:
    root.mkdir()
    (root / "index.html").write_text("<!doctype html><html><head><title>sdgraph</title></head><body><p>console</p>"
                                     "</body></html>")
    if built:
        assets = root / "dist" / "assets"
        assets.mkdir(parents=True)
        (root / "dist" / "index.html").write_text("<!doctype html><title>sdgraph editor</title>")
        (assets / "app-1234.js").write_text("console.log('editor')")
        (assets / "app-1234.css").write_text("body{}")
        (assets / "logo.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")
        (root / "dist" / ".env").write_text("SECRET=1")
    return root


async def fetch(server: LiveServer, path: str) -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as session:
        async with session.get(server.url + path) as answer:
            return answer.status, answer.headers.get("Content-Type", ""), (await answer.read()).decode(errors="replace")


def test_the_built_editor_and_its_assets_are_served_with_their_types(start_server: Callable[..., LiveServer],
                                                                       tmp_path: Path) -> None:
    server = start_server(web_root=make_web_root(tmp_path / "web", built=True))
    status, content_type, page = run(fetch(server, "/"))
    assert (status, page) == (200, "<!doctype html><title>sdgraph editor</title>")
    assert content_type.startswith("text/html")
    assert run(fetch(server, "/assets/app-1234.js"))[:2] == (200, "text/javascript")
    assert run(fetch(server, "/assets/app-1234.css"))[:2] == (200, "text/css")
    assert run(fetch(server, "/assets/logo.svg"))[:2] == (200, "image/svg+xml")
    assert run(fetch(server, "/web/index.html"))[0] == 200  # the console stays reachable


def test_the_editor_folder_lists_nothing_and_hides_dot_files(start_server: Callable[..., LiveServer],
                                                              tmp_path: Path) -> None:
    server = start_server(web_root=make_web_root(tmp_path / "web", built=True))
    for path in ("/assets", "/assets/", "/.env", "/assets/missing.js", "/assets/..%2F.env", "/assets/%2e%2e/.env"):
        assert run(fetch(server, path))[0] == 404, path
    assert run(fetch(server, "/web/"))[0] == 403  # aiohttp's static folder refuses listings


def test_without_a_build_the_console_says_how_to_build_the_editor(start_server: Callable[..., LiveServer],
                                                                   tmp_path: Path) -> None:
    server = start_server(web_root=make_web_root(tmp_path / "web", built=False))
    status, content_type, page = run(fetch(server, "/"))
    assert status == 200 and content_type.startswith("text/html")
    assert "Build the editor with <code>npm --prefix web ci && npm --prefix web run build</code>" in page
    assert "<p>console</p>" in page
    assert run(fetch(server, "/assets/app.js"))[0] == 404
