"""sdgraph's HTTP and websocket server: ComfyUI's API (comfyui-interface.md sections 6-8) over the engine.

A thin layer: the engine validates, runs and caches; the queue keeps items and history (in SQLite, so they
survive restarts); this module turns HTTP requests into calls on them and engine events into websocket
messages. One worker thread runs prompts one at a time; the aiohttp event loop never blocks on a node.
Every route is also served under `/api/`, as ComfyUI's current frontend calls it.

Safety: requests whose `Origin` host differs from `Host` are refused (ComfyUI's protection of a loopback
server against cross-site requests). A loopback server also refuses `Host` names other than its own (DNS
rebinding). With an auth token every route needs `Authorization: Bearer TOKEN`; browsers may instead open
`/?token=TOKEN` once (which sets a SameSite=Strict cookie) or pass `?token=` to `/ws` and `/view`. Every
file name from a request goes through `resolve_inside`; JSON bodies, uploads and the queue are bounded.

Shutdown (SIGTERM or SIGINT): the running prompt is interrupted at its next progress tick or node boundary
(a node without ticks finishes first) and goes back to the pending queue to run first on the next start;
websockets are closed with "going away"; the database is closed after its last commit.
"""
from __future__ import annotations

import asyncio
import hmac
import importlib.metadata
import ipaddress
import json
import logging
import math
import os
import platform
import sys
import threading
import time
import traceback
import uuid
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable
from urllib.parse import urlsplit

from aiohttp import WSCloseCode, WSMsgType, web
from aiohttp.http_exceptions import HttpProcessingError

from engine import folder_files

from engine import Executor, Registry, RunSettings, ValidationResult, validate_prompt
from engine.events import Event, ExecutionError, ExecutionStart, Executing, Progress
from engine.model_folders import MODEL_FOLDERS, model_files
from engine.folder_files import MAX_UPLOAD_BYTES, FileRequestError
from engine.paths import UnsafePathError
from engine.queue import ClientQueueFull, DuplicatePrompt, PromptQueue, QueueFull, QueueItem

log = logging.getLogger("sdgraph.server")

WEB_ROOT = Path(__file__).resolve().parent / "web"
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
#: Messages a history entry's `status.messages` keeps, as ComfyUI's does.
HISTORY_MESSAGES = {"execution_start", "execution_cached", "execution_success", "execution_error",
                    "execution_interrupted"}
MAX_JSON_BYTES = 32 * 1024 * 1024  # a workflow with its UI graph in extra_pnginfo is a few MB at most
PREVIEW_FORMATS = {"JPEG": 1, "PNG": 2}
#: At most this many binary previews a second per prompt; more only cost bandwidth.
PREVIEWS_PER_SECOND = 4
TOKEN_COOKIE = "sdgraph_token"
#: GET routes a browser opens directly (a page, an <img>, a WebSocket), where it cannot set a header.
TOKEN_IN_QUERY = {"/", "/ws", "/view", "/api/ws", "/api/view"}
DEFAULT_DATABASE = ".sdgraph-queue.sqlite3"
BUILD_HINT = "npm --prefix web ci && npm --prefix web run build"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Server:
    """The server's state: executor, queue, connected websockets and the worker thread."""

    def __init__(self, settings: RunSettings, registry: Registry, executor: Executor | None = None,
                 allowed_hosts: Iterable[str] | None = None, *, database: str | Path | None = None,
                 auth_token: str | None = None, free_models: Callable[[], None] | None = None,
                 web_root: Path = WEB_ROOT, max_pending: int | None = None) -> None:
        """`allowed_hosts`: the host names requests may address (None: any, for a server on a LAN).
        `database`: the queue's SQLite file (default `.sdgraph-queue.sqlite3` in the output folder;
        ":memory:" keeps nothing). `free_models`: called by `POST /free` to release loaded models."""
        self.settings = settings
        self.registry = registry
        self.allowed_hosts = None if allowed_hosts is None else frozenset(h.lower() for h in allowed_hosts)
        self.auth_token = auth_token or None
        self.free_models = free_models
        self.web_root = web_root
        self.executor = executor or Executor(registry, settings=settings)
        self.database = database if database is not None else settings.output_dir / DEFAULT_DATABASE
        limits = {} if max_pending is None else {"max_pending": max_pending}
        self.queue = PromptQueue(self.database, on_change=self._queue_changed, **limits)
        for prompt_id in self.queue.recovered_failures:
            log.warning("prompt %s was running at two crashes in a row; marked failed", prompt_id)
        self.executor.subscribe(self._on_event)
        self.sockets: dict[str, set[asyncio.Queue]] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stopping = threading.Event()
        self._worker: threading.Thread | None = None
        self._current: QueueItem | None = None
        self._current_node: str | None = None
        self._last_preview = 0.0
        self._messages: list[tuple[str, dict[str, Any]]] = []
        self._open_sockets: set[web.WebSocketResponse] = set()

    # --- lifecycle ---------------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(middlewares=[known_hosts_only(self.allowed_hosts), same_origin_only,
                                           token_required(self.auth_token)],
                              client_max_size=MAX_UPLOAD_BYTES + 1024 * 1024)
        routes = [
            ("GET", "/object_info", self.object_info), ("GET", "/object_info/{node_class}", self.object_info_one),
            ("POST", "/prompt", self.post_prompt), ("GET", "/prompt", self.get_prompt),
            ("GET", "/queue", self.get_queue), ("POST", "/queue", self.post_queue),
            ("GET", "/history", self.get_history), ("GET", "/history/{prompt_id}", self.get_history_entry),
            ("POST", "/history", self.post_history), ("POST", "/interrupt", self.post_interrupt),
            ("POST", "/free", self.post_free), ("GET", "/view", self.view),
            ("POST", "/upload/image", self.upload_image), ("POST", "/upload/mask", self.upload_mask),
            ("GET", "/system_stats", self.system_stats), ("GET", "/features", self.features),
            ("GET", "/models", self.models), ("GET", "/models/{folder}", self.models_in),
            ("GET", "/embeddings", self.embeddings), ("GET", "/ws", self.websocket),
        ]
        for method, path, handler in routes:
            app.router.add_route(method, path, handler)
            app.router.add_route(method, "/api" + path, handler)
        app.router.add_get("/", self.index)
        if self.web_root.is_dir():
            app.router.add_static("/web/", self.web_root, follow_symlinks=False)
        app.router.add_get("/{name:.+}", self.editor_file)  # the built editor's assets; last, after the API
        app.on_startup.append(self._start)
        app.on_shutdown.append(self._shutdown)
        app.on_cleanup.append(self._close)
        return app

    async def _start(self, app: web.Application) -> None:
        self.loop = asyncio.get_running_loop()
        for folder in (self.settings.input_dir, self.settings.output_dir, self.settings.temp_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self._stopping.clear()
        self._worker = threading.Thread(target=self._work, name="sdgraph-worker", daemon=True)
        self._worker.start()

    async def _shutdown(self, app: web.Application) -> None:
        """Stop the worker first (its prompt goes back to the queue), then close every websocket."""
        self._stopping.set()
        self.executor.interrupt()
        if self._worker is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._worker.join, 30)
        for socket in list(self._open_sockets):
            await socket.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")

    async def _close(self, app: web.Application) -> None:
        await self._shutdown(app)
        self.queue.close()

    # --- the worker thread ---------------------------------------------------------------------------------
    def _work(self) -> None:
        while not self._stopping.is_set():
            item = self.queue.take(timeout=0.2)
            if item is None:
                continue
            if self._stopping.is_set():
                self.queue.requeue(item)
                return
            self._run(item)

    def _run(self, item: QueueItem) -> None:
        self._current, self._current_node, self._messages, self._last_preview = item, None, [], 0.0
        outputs: dict[str, Any] = {}
        status = "error"
        try:
            result = self.executor.execute(item.prompt, item.prompt_id, item.outputs_to_execute or None,
                                           item.extra_data)
            if result.status == "interrupted" and self._stopping.is_set():
                self._current = None
                self.queue.requeue(item)  # stopped by the shutdown, not by its user: it runs again
                return
            outputs, status = result.outputs, ("success" if result.ok else "error")
            if result.status == "invalid":
                self._report_invalid(item, result.validation)
        except Exception as crash:  # the engine reports node failures itself; this is a bug, not a node error
            log.exception("prompt %s crashed the executor", item.prompt_id)
            self._on_event(ExecutionError(item.prompt_id, exception_message=str(crash),
                                          exception_type=type(crash).__name__,
                                          traceback=traceback.format_exception(crash)))
        self._current = None
        self.queue.finish(item, outputs, status, self._messages, notify=False)
        # Only now that the history entry exists: ComfyUI's clients read /history/{id} on this message.
        self._post(item.client_id, {"type": "executing", "data": Executing(item.prompt_id, None).data()})
        self._queue_changed()

    def _report_invalid(self, item: QueueItem, validation: ValidationResult) -> None:
        """A prompt valid when queued but not when its turn came (say a model file was deleted meanwhile)
        gets a start and an error like a failed node, so its client does not wait forever."""
        node_id = next(iter(validation.node_errors), "")
        node_type = validation.node_errors[node_id].class_type if node_id else ""
        error_type = validation.error.type if validation.error is not None else "invalid_prompt"
        self._on_event(ExecutionStart(item.prompt_id))
        self._on_event(ExecutionError(item.prompt_id, node_id=node_id, node_type=node_type,
                                      exception_message="\n".join(validation.messages()), exception_type=error_type))

    def _on_event(self, event: Event) -> None:
        """Called on the worker thread for every engine event of the running prompt."""
        if isinstance(event, Executing):
            self._current_node = event.node
        if not event.comfyui or (isinstance(event, Executing) and event.node is None):
            return  # the worker sends the final `executing` itself, after the history entry is written
        data = event.data()
        if event.type in HISTORY_MESSAGES:
            self._messages.append((event.type, data))
        client_id = self._current.client_id if self._current else None
        self._post(client_id, {"type": event.type, "data": data})
        if isinstance(event, Progress) and event.preview is not None and self.settings.preview != "none":
            now = time.monotonic()
            if now - self._last_preview >= 1 / PREVIEWS_PER_SECOND:
                frame = preview_frame(event.preview)
                if frame is not None:
                    self._last_preview = now
                    self._post(client_id, frame)

    def _queue_changed(self) -> None:
        self._post(None, self.status_message())

    def _post(self, client_id: str | None, message: dict[str, Any] | bytes) -> None:
        """Queue a message for one client's sockets (every socket when `client_id` is None), from any thread."""
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        def deliver() -> None:
            targets = self.sockets.get(client_id, set()) if client_id else set().union(*self.sockets.values())
            for outbox in targets:
                outbox.put_nowait(message)
        try:
            loop.call_soon_threadsafe(deliver)
        except RuntimeError:  # the loop closed between the check and the call
            pass

    def status_message(self, sid: str | None = None) -> dict[str, Any]:
        data: dict[str, Any] = {"status": {"exec_info": {"queue_remaining": self.queue.remaining()}}}
        if sid is not None:
            data["sid"] = sid
        return {"type": "status", "data": data}

    # --- routes: nodes and prompts -------------------------------------------------------------------------
    async def object_info(self, request: web.Request) -> web.Response:
        return web.json_response(self.registry.object_info(self.settings))

    async def object_info_one(self, request: web.Request) -> web.Response:
        node_type = self.registry.get(request.match_info["node_class"])
        return web.json_response({} if node_type is None else {node_type.name: node_type.object_info(self.settings)})

    async def post_prompt(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        prompt = body.get("prompt")
        extra_data, prompt_id = body.get("extra_data") or {}, body.get("prompt_id")
        if not isinstance(extra_data, dict):
            raise JsonError(400, "invalid_prompt", "'extra_data' must be a JSON object")
        if prompt_id is not None and (not isinstance(prompt_id, str) or not prompt_id.strip()):
            raise JsonError(400, "invalid_prompt", "'prompt_id' must be a non-empty string")
        validation = await asyncio.get_running_loop().run_in_executor(
            None, validate_prompt, prompt, self.registry, body.get("partial_execution_targets"), self.settings)
        answer = validation.to_json()
        if not validation.ok:
            return web.json_response(answer, status=400)
        extra_data = dict(extra_data)
        if body.get("client_id") is not None:
            extra_data["client_id"] = str(body["client_id"])
        number = body.get("number")
        number = finite_float(number) if isinstance(number, (int, float)) and not isinstance(number, bool) else None
        try:
            item = self.queue.put(prompt_id or str(uuid.uuid4()), prompt, extra_data, list(validation.outputs),
                                  front=bool(body.get("front")), number=number)
        except ClientQueueFull as full:
            raise JsonError(429, "client_queue_full", str(full))
        except QueueFull as full:
            raise JsonError(503, "queue_full", str(full), headers={"Retry-After": "5"})
        except DuplicatePrompt as duplicate:
            raise JsonError(400, "duplicate_prompt_id", str(duplicate))
        return web.json_response({"prompt_id": item.prompt_id, "number": item.number,
                                  "node_errors": answer["node_errors"]})

    async def get_prompt(self, request: web.Request) -> web.Response:
        return web.json_response({"exec_info": {"queue_remaining": self.queue.remaining()}})

    async def get_queue(self, request: web.Request) -> web.Response:
        return web.json_response({"queue_running": [item.to_json() for item in self.queue.running()],
                                  "queue_pending": [item.to_json() for item in self.queue.pending()]})

    async def post_queue(self, request: web.Request) -> web.Response:
        return await clear_or_delete(request, self.queue.clear, self.queue.delete)

    async def get_history(self, request: web.Request) -> web.Response:
        max_items = int_query(request, "max_items")
        offset = int_query(request, "offset", negative_is_none=True)  # ComfyUI's default -1: the newest entries
        return web.json_response(self.queue.history(max_items, offset))

    async def get_history_entry(self, request: web.Request) -> web.Response:
        return web.json_response(self.queue.history_entry(request.match_info["prompt_id"]))

    async def post_history(self, request: web.Request) -> web.Response:
        return await clear_or_delete(request, self.queue.clear_history, self.queue.delete_history)

    async def post_interrupt(self, request: web.Request) -> web.Response:
        body = await json_body(request, allow_empty=True)
        wanted = body.get("prompt_id")
        running = self._current
        if wanted is None or (running is not None and running.prompt_id == wanted):
            self.executor.interrupt()
        return web.Response(status=200)

    async def post_free(self, request: web.Request) -> web.Response:
        """Both flags drop cached node results (which hold the loaded models); `free_models` then lets the
        model manager release what it still holds."""
        body = await json_body(request, allow_empty=True)
        if body.get("free_memory") or body.get("unload_models"):
            self.executor.cache.clear()
            if self.free_models is not None:
                await asyncio.get_running_loop().run_in_executor(None, self.free_models)
        return web.Response(status=200)

    # --- routes: files ---------------------------------------------------------------------------------------
    async def view(self, request: web.Request) -> web.StreamResponse:
        answer = await in_thread(folder_files.view, self.settings, dict(request.query))
        headers = {"Content-Type": answer.content_type, "X-Content-Type-Options": "nosniff",
                   "Content-Disposition": f'{answer.disposition}; filename="{answer.filename}"'}
        if answer.path is not None:
            return web.FileResponse(answer.path, headers=headers)
        return web.Response(body=answer.content, headers=headers)

    async def upload_image(self, request: web.Request) -> web.Response:
        return await self._upload(request, mask=False)

    async def upload_mask(self, request: web.Request) -> web.Response:
        return await self._upload(request, mask=True)

    async def _upload(self, request: web.Request, mask: bool) -> web.Response:
        try:
            fields = await request.post()
        except web.HTTPRequestEntityTooLarge:
            raise JsonError(413, "upload_too_large", f"uploads are limited to {MAX_UPLOAD_BYTES} bytes",
                            headers={"Connection": "close"})
        except (ValueError, HttpProcessingError) as problem:  # a multipart body aiohttp cannot parse
            raise JsonError(400, "bad_file_request", f"malformed multipart body: {problem}")
        upload = fields.get("image")
        if not isinstance(upload, web.FileField):
            raise JsonError(400, "bad_file_request", "upload needs a multipart file field 'image'")
        text_fields = {name: value for name, value in fields.items() if isinstance(value, str)}
        return web.json_response(await in_thread(folder_files.save_upload, self.settings, text_fields,
                                                 upload.file.read(), upload.filename or "", mask))

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response(sorted(MODEL_FOLDERS))

    async def models_in(self, request: web.Request) -> web.Response:
        folder = request.match_info["folder"]
        if folder not in MODEL_FOLDERS:
            raise web.HTTPNotFound(text=f"unknown model folder {folder!r}")
        return web.json_response(model_files(self.settings.model_roots, folder))

    async def embeddings(self, request: web.Request) -> web.Response:
        return web.json_response([Path(name).with_suffix("").as_posix()
                                  for name in model_files(self.settings.model_roots, "embeddings")])

    # --- routes: the system and the editor -----------------------------------------------------------------
    async def system_stats(self, request: web.Request) -> web.Response:
        # Importing torch the first time takes seconds: not on the event loop.
        stats = await asyncio.get_running_loop().run_in_executor(None, system_stats)
        return web.json_response(stats)

    async def features(self, request: web.Request) -> web.Response:
        return web.json_response({"supports_preview_metadata": False, "max_upload_size": MAX_UPLOAD_BYTES})

    async def index(self, request: web.Request) -> web.StreamResponse:
        """The built editor when web/dist exists; else the API console with a note on building it."""
        built = self.web_root / "dist" / "index.html"
        if built.is_file():
            return web.FileResponse(built, headers={"Content-Type": "text/html; charset=utf-8"})
        console = self.web_root / "index.html"
        if not console.is_file():
            raise web.HTTPNotFound(text=f"the editor is not installed; build it with: {BUILD_HINT}")
        banner = ('<div style="grid-column:1/-1;padding:6px 10px;background:#fff3cd;border-bottom:1px solid #e0c36a">'
                  f"The node editor is not built; this is the API console. Build the editor with "
                  f"<code>{BUILD_HINT}</code> and reload.</div>")
        page = console.read_text(encoding="utf-8").replace("<body>", "<body>\n" + banner, 1)
        return web.Response(text=page, content_type="text/html", charset="utf-8")

    async def editor_file(self, request: web.Request) -> web.StreamResponse:
        try:
            path = folder_files.built_file(self.web_root / "dist", request.match_info["name"])
        except (FileNotFoundError, UnsafePathError):
            raise web.HTTPNotFound()
        return web.FileResponse(path, headers={"Content-Type": folder_files.content_type_of(path),
                                               "X-Content-Type-Options": "nosniff"})

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse(heartbeat=30)
        await socket.prepare(request)
        client_id = request.query.get("clientId") or uuid.uuid4().hex
        outbox: asyncio.Queue = asyncio.Queue()
        self.sockets.setdefault(client_id, set()).add(outbox)
        self._open_sockets.add(socket)
        outbox.put_nowait(self.status_message(sid=client_id))
        running = self._current
        if running is not None and running.client_id == client_id and self._current_node is not None:
            # A client reconnecting mid-run learns where its prompt is, as with ComfyUI.
            outbox.put_nowait({"type": "executing",
                               "data": Executing(running.prompt_id, self._current_node).data()})
        sender = asyncio.create_task(send_loop(socket, outbox))
        try:
            async for message in socket:
                if message.type == WSMsgType.ERROR:
                    break
        finally:
            sender.cancel()
            self._open_sockets.discard(socket)
            clients = self.sockets.get(client_id, set())
            clients.discard(outbox)
            if not clients:
                self.sockets.pop(client_id, None)
        return socket


async def send_loop(socket: web.WebSocketResponse, outbox: asyncio.Queue) -> None:
    """One writer per socket, so messages leave in the order the engine emitted them."""
    while True:
        message = await outbox.get()
        if socket.closed:
            return
        if isinstance(message, bytes):
            await socket.send_bytes(message)
        else:
            await socket.send_str(json.dumps(message))


def preview_frame(preview: Any) -> bytes | None:
    """A binary preview frame: big-endian event type 1, then the image format, then the encoded image.
    Nodes pass previews as `(format, encoded_bytes)` with format "JPEG" or "PNG"; a PIL image in place of
    the bytes (and an optional third item, the largest side) is encoded here, as ComfyUI's nodes send."""
    if not isinstance(preview, tuple) or len(preview) not in (2, 3) or preview[0] not in PREVIEW_FORMATS:
        return None
    image_format, encoded = preview[0], preview[1]
    if not isinstance(encoded, (bytes, bytearray, memoryview)):
        encoded = folder_files.encode_preview(encoded, image_format, preview[2] if len(preview) == 3 else 512)
        if encoded is None:
            return None
    return (1).to_bytes(4, "big") + PREVIEW_FORMATS[image_format].to_bytes(4, "big") + bytes(encoded)


# --- middlewares ---------------------------------------------------------------------------------------------

def known_hosts_only(allowed: frozenset[str] | None) -> Any:
    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        name = urlsplit("//" + request.host).hostname or ""
        if allowed is not None and name.lower() not in allowed:
            raise web.HTTPForbidden(text=f"requests for host {name!r} are refused; if it is yours, start the "
                                         f"server with --allow-host {name}")
        return await handler(request)
    return check


def allowed_hosts_for(bind_host: str, extra: Iterable[str] = ()) -> frozenset[str] | None:
    """The host names a server bound to `bind_host` answers: on loopback its own names and `extra`;
    elsewhere (a LAN server, reached under names it cannot know) any."""
    if not is_loopback(bind_host):
        return None
    return LOOPBACK_NAMES | {bind_host.lower()} | {name.lower() for name in extra}


@web.middleware
async def same_origin_only(request: web.Request, handler: Handler) -> web.StreamResponse:
    origin = request.headers.get("Origin")
    if origin:  # "null" too: sandboxed iframes and data: pages send it, and they are cross-site
        if urlsplit(origin).netloc.lower() != request.host.lower():
            raise web.HTTPForbidden(text=f"cross-origin request from {origin} refused")
    return await handler(request)


def token_required(token: str | None) -> Any:
    """Every route needs the token once one is set (see the module docstring for where it may travel)."""
    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if token is None:
            return await handler(request)
        header = request.headers.get("Authorization", "")
        offered = [header[7:].strip() if header.lower().startswith("bearer ") else "",
                   request.cookies.get(TOKEN_COOKIE, "")]
        in_query = request.method == "GET" and request.path in TOKEN_IN_QUERY and "token" in request.query
        if in_query:
            offered.append(request.query["token"])
        if not any(candidate and hmac.compare_digest(candidate.encode(), token.encode()) for candidate in offered):
            raise JsonError(401, "unauthorized",
                             "this server needs its token: 'Authorization: Bearer TOKEN' (or ?token= on /, /ws "
                             "and /view)", headers={"WWW-Authenticate": "Bearer"})
        response = await handler(request)
        if in_query and request.path == "/":
            # The page's own requests then carry the token; SameSite=Strict keeps other sites from using it.
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="Strict", path="/")
        return response
    return check


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# --- request bodies and errors -------------------------------------------------------------------------

async def json_body(request: web.Request, allow_empty: bool = False) -> dict[str, Any]:
    too_large = JsonError(413, "body_too_large", f"request bodies are limited to {MAX_JSON_BYTES} bytes",
                          headers={"Connection": "close"})  # the unread rest of the body must not stay queued
    if (request.content_length or 0) > MAX_JSON_BYTES:
        raise too_large
    raw = bytearray()
    while chunk := await request.content.read(1 << 16):
        raw += chunk
        if len(raw) > MAX_JSON_BYTES:
            raise too_large
    if not raw.strip() and allow_empty:
        return {}
    try:
        body = json.loads(raw, parse_constant=not_json, parse_float=json_float)
    except (ValueError, UnicodeDecodeError) as problem:  # ValueError: an integer beyond Python's digit limit
        raise JsonError(400, "invalid_json", f"request body is not JSON: {problem}")
    if not isinstance(body, dict):
        raise JsonError(400, "invalid_json", "request body must be a JSON object")
    return body


def not_json(constant: str) -> None:
    # Python's json reads NaN and Infinity, which JSON lacks: once stored, every /queue and /history answer
    # would carry them and no browser could parse it.
    raise ValueError(f"{constant} is not a JSON number")


def json_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999: read as infinity, written back as Infinity
        not_json(text)
    return value


def finite_float(number: int | float) -> float:
    """A prompt's `number` as a float (JSON floats are finite already; json_float saw to that)."""
    try:
        return float(number)
    except OverflowError:  # an integer of hundreds of digits
        raise JsonError(400, "invalid_prompt", "'number' is too large") from None


async def clear_or_delete(request: web.Request, clear: Callable[[], None],
                          delete: Callable[[list[str]], None]) -> web.Response:
    """`POST /queue` and `POST /history`: `{"clear": true}` and/or `{"delete": [prompt_id, ...]}`."""
    body = await json_body(request)
    if "delete" in body and not isinstance(body["delete"], list):
        raise JsonError(400, "invalid_request", "'delete' must be a list of prompt ids")
    if body.get("clear"):
        clear()
    if "delete" in body:
        delete([str(prompt_id) for prompt_id in body["delete"]])
    return web.Response(status=200)


class JsonError(web.HTTPException):
    """An HTTP error whose body has the shape of ComfyUI's prompt errors, so clients show `message`."""

    def __init__(self, status: int, error_type: str, message: str, headers: dict[str, str] | None = None) -> None:
        self.status_code = status  # aiohttp's error classes fix the status per class; this one takes any
        body = {"error": {"type": error_type, "message": message, "details": "", "extra_info": {}},
                "node_errors": {}}
        super().__init__(text=json.dumps(body), content_type="application/json", headers=headers)


async def in_thread(function: Callable[..., Any], *args: Any) -> Any:
    """Run file work off the event loop, turning folder_files' refusals into 403, 404 and 400 answers."""
    try:
        return await asyncio.get_running_loop().run_in_executor(None, function, *args)
    except UnsafePathError as problem:
        raise JsonError(403, "forbidden_path", str(problem))
    except FileNotFoundError as problem:
        raise JsonError(404, "file_not_found", str(problem))
    except FileRequestError as problem:
        raise JsonError(400, "bad_file_request", str(problem))


def int_query(request: web.Request, name: str, negative_is_none: bool = False) -> int | None:
    value = request.query.get(name)
    if value is None:
        return None
    try:
        number = int(value)
    except ValueError:
        raise web.HTTPBadRequest(text=f"query parameter {name} must be an integer, got {value!r}")
    return None if negative_is_none and number < 0 else max(0, number)


def system_stats() -> dict[str, Any]:
    """ComfyUI's `/system_stats`: the system, versions and a device list (torch's view when installed)."""
    versions = {"sdgraph": package_version("sdgraph"), "aiohttp": package_version("aiohttp")}
    stats: dict[str, Any] = {"system": {"os": platform.system().lower(), "python_version": sys.version,
                                        "embedded_python": False, "argv": sys.argv, "versions": versions,
                                        "sdgraph_version": versions["sdgraph"]}, "devices": []}
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        stats["system"]["ram_total"] = pages * page_size
        stats["system"]["ram_free"] = os.sysconf("SC_AVPHYS_PAGES") * page_size
    except (ValueError, OSError, AttributeError):
        pass
    try:
        import torch  # the server itself needs no torch; the stats describe what the nodes will use
    except ImportError:
        return stats
    stats["system"]["pytorch_version"] = versions["torch"] = torch.__version__
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(index)
            reserved = torch.cuda.memory_reserved(index)
            stats["devices"].append({"name": torch.cuda.get_device_name(index), "type": "cuda", "index": index,
                                     "vram_total": total, "vram_free": free, "torch_vram_total": reserved,
                                     "torch_vram_free": reserved - torch.cuda.memory_allocated(index)})
    else:
        stats["devices"].append({"name": "cpu", "type": "cpu", "index": None,
                                 "vram_total": stats["system"].get("ram_total", 0),
                                 "vram_free": stats["system"].get("ram_free", 0),
                                 "torch_vram_total": 0, "torch_vram_free": 0})
    return stats


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# --- running it ------------------------------------------------------------------------------------------------

def serve(settings: RunSettings, host: str = "127.0.0.1", port: int = 8188, registry: Registry | None = None,
          allow_hosts: Iterable[str] = (), *, database: str | Path | None = None, auth_token: str | None = None,
          executor: Executor | None = None, free_models: Callable[[], None] | None = None) -> None:
    """Run the server until SIGTERM or SIGINT (`sdgraph serve`). Bound to loopback, it answers only
    requests for loopback names, its own host and `allow_hosts` (say a reverse proxy's name); bound to other
    addresses, any name, and it warns when that happens without a token."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not is_loopback(host):
        print(f"sdgraph: warning: listening on {host}: every machine that reaches this one can queue prompts "
              f"and read your inputs and outputs" + ("" if auth_token else "; set --auth-token"),
              file=sys.stderr, flush=True)
    state = Server(settings, registry or Registry(), executor, allowed_hosts=allowed_hosts_for(host, allow_hosts),
                   database=database, auth_token=auth_token, free_models=free_models)
    log.info("sdgraph: %d node types; queue in %s; serving on http://%s:%d", len(state.registry),
             state.database, host, port)
    web.run_app(state.app(), host=host, port=port, print=None, shutdown_timeout=5)

if __name__ == "__main__":
    import cli  # `python server.py ARGS` is `sdgraph serve ARGS`
    sys.exit(cli.main(["serve", *sys.argv[1:]]))
