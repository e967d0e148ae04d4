"""sdgraph's HTTP and websocket server: ComfyUI's API (comfyui-interface.md sections 6-8) over the engine.

A thin layer: the engine validates, runs and caches; the queue keeps items and history; this module turns
HTTP requests into calls on them and engine events into websocket messages. One worker thread runs
prompts one at a time; the aiohttp event loop never blocks on a node. Every route is also served under
`/api/`, as ComfyUI's current frontend calls it.

Safety: requests whose `Origin` host differs from `Host` are refused (ComfyUI's protection of a loopback
server against cross-site requests). A loopback server also refuses `Host` names other than its own: a page
on a rebinding DNS name would otherwise pass the origin check with matching names (DNS rebinding). Every
file name from a request goes through `resolve_inside`.
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import mimetypes
import os
import platform
import sys
import threading
import traceback
import uuid
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable
from urllib.parse import urlsplit

from aiohttp import WSMsgType, web

from engine import Executor, Registry, RunSettings, ValidationResult, validate_prompt
from engine.events import Event, ExecutionError, ExecutionStart, Executing, Progress
from engine.model_folders import MODEL_FOLDERS, model_files
from engine.paths import UnsafePathError, resolve_inside
from engine.queue import PromptQueue, QueueItem

log = logging.getLogger("sdgraph.server")

WEB_ROOT = Path(__file__).resolve().parent / "web"
#: Messages a history entry's `status.messages` keeps, as ComfyUI's does.
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
HISTORY_MESSAGES = {"execution_start", "execution_cached", "execution_success", "execution_error",
                    "execution_interrupted"}
MAX_UPLOAD_BYTES = 100 * 1024 * 1024
PREVIEW_FORMATS = {"JPEG": 1, "PNG": 2}
#: Content types `/view` shows in the browser; anything else is sent as a download.
INLINE_MEDIA = ("image/", "video/", "audio/")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Server:
    """The server's state: executor, queue, connected websockets and the worker thread."""

    def __init__(self, settings: RunSettings, registry: Registry, executor: Executor | None = None,
                 allowed_hosts: Iterable[str] | None = None) -> None:
        """`allowed_hosts`: the host names requests may address (None: any, for a server on a LAN)."""
        self.settings = settings
        self.registry = registry
        self.allowed_hosts = None if allowed_hosts is None else frozenset(h.lower() for h in allowed_hosts)
        self.executor = executor or Executor(registry, settings=settings)
        self.queue = PromptQueue(on_change=self._queue_changed)
        self.executor.subscribe(self._on_event)
        self.sockets: dict[str, set[asyncio.Queue]] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stopping = threading.Event()
        self._worker: threading.Thread | None = None
        self._current: QueueItem | None = None
        self._messages: list[tuple[str, dict[str, Any]]] = []

    # --- lifecycle ---------------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(middlewares=[known_hosts_only(self.allowed_hosts), same_origin_only],
                              client_max_size=MAX_UPLOAD_BYTES)
        routes = [
            ("GET", "/object_info", self.object_info), ("GET", "/object_info/{node_class}", self.object_info_one),
            ("POST", "/prompt", self.post_prompt), ("GET", "/prompt", self.get_prompt),
            ("GET", "/queue", self.get_queue), ("POST", "/queue", self.post_queue),
            ("GET", "/history", self.get_history), ("GET", "/history/{prompt_id}", self.get_history_entry),
            ("POST", "/history", self.post_history), ("POST", "/interrupt", self.post_interrupt),
            ("POST", "/free", self.post_free), ("GET", "/view", self.view),
            ("POST", "/upload/image", self.upload_image), ("GET", "/system_stats", self.system_stats),
            ("GET", "/features", self.features), ("GET", "/models", self.models),
            ("GET", "/models/{folder}", self.models_in), ("GET", "/embeddings", self.embeddings),
            ("GET", "/ws", self.websocket),
        ]
        for method, path, handler in routes:
            app.router.add_route(method, path, handler)
            app.router.add_route(method, "/api" + path, handler)
        app.router.add_get("/", self.index)
        if WEB_ROOT.is_dir():
            app.router.add_static("/web/", WEB_ROOT, follow_symlinks=False)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, app: web.Application) -> None:
        self.loop = asyncio.get_running_loop()
        for folder in (self.settings.input_dir, self.settings.output_dir, self.settings.temp_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self._stopping.clear()
        self._worker = threading.Thread(target=self._work, name="sdgraph-worker", daemon=True)
        self._worker.start()

    async def _stop(self, app: web.Application) -> None:
        self._stopping.set()
        self.executor.interrupt()
        if self._worker is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._worker.join, 10)

    # --- the worker thread ---------------------------------------------------------------------------------
    def _work(self) -> None:
        while not self._stopping.is_set():
            item = self.queue.take(timeout=0.2)
            if item is None:
                continue
            self._current, self._messages = item, []
            outputs: dict[str, Any] = {}
            status = "error"
            try:
                result = self.executor.execute(item.prompt, item.prompt_id, item.outputs_to_execute or None,
                                               item.extra_data)
                outputs, status = result.outputs, ("success" if result.ok else "error")
                if result.status == "invalid":
                    self._report_invalid(item, result.validation)
            except Exception as crash:  # the engine reports node failures itself; this is a bug, not a node error
                log.exception("prompt %s crashed the executor", item.prompt_id)
                self._on_event(ExecutionError(item.prompt_id, exception_message=str(crash),
                                              exception_type=type(crash).__name__,
                                              traceback=traceback.format_exception(crash)))
            finally:
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
        if not event.comfyui or (isinstance(event, Executing) and event.node is None):
            return  # the worker sends the final `executing` itself, after the history entry is written
        data = event.data()
        if event.type in HISTORY_MESSAGES:
            self._messages.append((event.type, data))
        client_id = self._current.client_id if self._current else None
        self._post(client_id, {"type": event.type, "data": data})
        if isinstance(event, Progress) and event.preview is not None:
            frame = preview_frame(event.preview)
            if frame is not None:
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
        targets = body.get("partial_execution_targets")
        validation = await asyncio.get_running_loop().run_in_executor(
            None, validate_prompt, prompt, self.registry, targets, self.settings)
        answer = validation.to_json()
        if not validation.ok:
            return web.json_response(answer, status=400)
        prompt_id = str(body.get("prompt_id") or uuid.uuid4())
        extra_data = dict(body.get("extra_data") or {})
        if body.get("client_id") is not None:
            extra_data["client_id"] = str(body["client_id"])
        number = body.get("number")
        item = self.queue.put(prompt_id, prompt, extra_data, list(validation.outputs), front=bool(body.get("front")),
                              number=float(number) if isinstance(number, (int, float)) else None)
        return web.json_response({"prompt_id": prompt_id, "number": item.number,
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
        body = await json_body(request, allow_empty=True)
        if body.get("free_memory") or body.get("unload_models"):
            self.executor.cache.clear()
        return web.Response(status=200)

    # --- routes: files ---------------------------------------------------------------------------------------
    async def view(self, request: web.Request) -> web.StreamResponse:
        query = request.query
        filename = query.get("filename", "")
        if not filename:
            raise web.HTTPBadRequest(text="view needs a filename")
        try:
            folder = self.settings.folder_for(query.get("type", "output"))
            path = resolve_inside(folder, str(Path(query.get("subfolder", "")) / filename))
        except (ValueError, UnsafePathError) as problem:
            raise web.HTTPForbidden(text=str(problem))
        if not path.is_file():
            raise web.HTTPNotFound(text=f"no file {filename!r} in {query.get('type', 'output')}")
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        disposition = "inline"
        if not content_type.startswith(INLINE_MEDIA) or content_type == "image/svg+xml":
            # Pages and SVGs run scripts with this server's origin: anything but plain media is a download.
            content_type, disposition = "application/octet-stream", "attachment"
        return web.FileResponse(path, headers={"Content-Type": content_type, "X-Content-Type-Options": "nosniff",
                                               "Content-Disposition": f'{disposition}; filename="{path.name}"'})

    async def upload_image(self, request: web.Request) -> web.Response:
        fields = await request.post()
        upload = fields.get("image")
        if not isinstance(upload, web.FileField):
            raise web.HTTPBadRequest(text="upload needs a multipart file field 'image'")
        subfolder = str(fields.get("subfolder", ""))
        name = Path(upload.filename or "").name
        if not name:
            raise web.HTTPBadRequest(text=f"upload needs a file name, got {upload.filename!r}")
        overwrite = str(fields.get("overwrite", "")).lower() in ("true", "1")
        try:
            folder = self.settings.folder_for(str(fields.get("type", "input")))
            target = resolve_inside(folder, str(Path(subfolder) / name))
        except (ValueError, UnsafePathError) as problem:
            raise web.HTTPForbidden(text=str(problem))
        content = upload.file.read()
        target = free_name(target, content, overwrite)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
        return web.json_response({"name": target.name, "subfolder": subfolder,
                                  "type": str(fields.get("type", "input"))})

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

    # --- routes: the system --------------------------------------------------------------------------------
    async def system_stats(self, request: web.Request) -> web.Response:
        return web.json_response(system_stats())

    async def features(self, request: web.Request) -> web.Response:
        return web.json_response({"supports_preview_metadata": False, "max_upload_size": MAX_UPLOAD_BYTES})

    async def index(self, request: web.Request) -> web.StreamResponse:
        page = WEB_ROOT / "index.html"
        if not page.is_file():
            raise web.HTTPNotFound(text="the editor is not installed (web/index.html is missing)")
        return web.FileResponse(page)

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse(heartbeat=30)
        await socket.prepare(request)
        client_id = request.query.get("clientId") or uuid.uuid4().hex
        outbox: asyncio.Queue = asyncio.Queue()
        self.sockets.setdefault(client_id, set()).add(outbox)
        outbox.put_nowait(self.status_message(sid=client_id))
        sender = asyncio.create_task(send_loop(socket, outbox))
        try:
            async for message in socket:
                if message.type == WSMsgType.ERROR:
                    break
        finally:
            sender.cancel()
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
    Nodes pass previews as `(format, encoded_bytes)` with format "JPEG" or "PNG"."""
    if isinstance(preview, tuple) and len(preview) == 2 and preview[0] in PREVIEW_FORMATS:
        image_format, encoded = preview
        return (1).to_bytes(4, "big") + PREVIEW_FORMATS[image_format].to_bytes(4, "big") + bytes(encoded)
    return None


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


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@web.middleware
async def same_origin_only(request: web.Request, handler: Handler) -> web.StreamResponse:
    origin = request.headers.get("Origin")
    if origin:  # "null" too: sandboxed iframes and data: pages send it, and they are cross-site
        origin_host = urlsplit(origin).netloc
        if origin_host.lower() != request.host.lower():
            raise web.HTTPForbidden(text=f"cross-origin request from {origin} refused")
    return await handler(request)


async def json_body(request: web.Request, allow_empty: bool = False) -> dict[str, Any]:
    text = await request.text()
    if not text.strip() and allow_empty:
        return {}
    try:
        body = json.loads(text)
    except json.JSONDecodeError as problem:
        raise web.HTTPBadRequest(text=f"request body is not JSON: {problem}")
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="request body must be a JSON object")
    return body


async def clear_or_delete(request: web.Request, clear: Callable[[], None],
                          delete: Callable[[list[str]], None]) -> web.Response:
    """`POST /queue` and `POST /history`: `{"clear": true}` and/or `{"delete": [prompt_id, ...]}`."""
    body = await json_body(request)
    if body.get("clear"):
        clear()
    if "delete" in body:
        delete([str(prompt_id) for prompt_id in list_field(body, "delete")])
    return web.Response(status=200)


def list_field(body: dict[str, Any], name: str) -> list[Any]:
    value = body[name]
    if not isinstance(value, list):
        raise web.HTTPBadRequest(text=f"'{name}' must be a list")
    return value


def int_query(request: web.Request, name: str, negative_is_none: bool = False) -> int | None:
    value = request.query.get(name)
    if value is None:
        return None
    try:
        number = int(value)
    except ValueError:
        raise web.HTTPBadRequest(text=f"query parameter {name} must be an integer, got {value!r}")
    return None if negative_is_none and number < 0 else max(0, number)


def free_name(target: Path, content: bytes, overwrite: bool) -> Path:
    """ComfyUI's upload naming: reuse an identical file, else `name (1).png`, `name (2).png`, ..."""
    if overwrite:
        return target
    candidate, counter = target, 1
    while candidate.exists():
        if candidate.read_bytes() == content:
            return candidate
        candidate = target.with_name(f"{target.stem} ({counter}){target.suffix}")
        counter += 1
    return candidate


def system_stats() -> dict[str, Any]:
    stats: dict[str, Any] = {"system": {"os": platform.system().lower(), "python_version": sys.version,
                                        "embedded_python": False, "argv": sys.argv}, "devices": []}
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
    stats["system"]["pytorch_version"] = torch.__version__
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(index)
            stats["devices"].append({"name": torch.cuda.get_device_name(index), "type": "cuda", "index": index,
                                     "vram_total": total, "vram_free": free,
                                     "torch_vram_total": torch.cuda.memory_reserved(index),
                                     "torch_vram_free": torch.cuda.memory_reserved(index)
                                     - torch.cuda.memory_allocated(index)})
    else:
        stats["devices"].append({"name": "cpu", "type": "cpu", "index": None,
                                 "vram_total": stats["system"].get("ram_total", 0),
                                 "vram_free": stats["system"].get("ram_free", 0),
                                 "torch_vram_total": 0, "torch_vram_free": 0})
    return stats


def serve(settings: RunSettings, host: str = "127.0.0.1", port: int = 8188, registry: Registry | None = None,
          allow_hosts: Iterable[str] = ()) -> None:
    """Run the server until interrupted (`sdgraph serve`). Bound to loopback, it answers only requests for
    loopback names, its own host and `allow_hosts` (say a reverse proxy's name); bound to other addresses,
    any name."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    server = Server(settings, registry or Registry(), allowed_hosts=allowed_hosts_for(host, allow_hosts))
    log.info("sdgraph: %d node types; serving on http://%s:%d", len(server.registry), host, port)
    web.run_app(server.app(), host=host, port=port, print=None)
