"""A Python client for sdgraph's (and ComfyUI's) HTTP and websocket API, async and sync.

    from engine.client import Client
    with Client("http://127.0.0.1:8188", token=None) as client:
        prompt_id = client.submit(workflow)                 # API-format JSON, as a dict
        entry = client.wait(prompt_id, on_progress=print)   # the history entry, once the prompt finished
        pngs = client.images(prompt_id)                     # the saved images' bytes

`AsyncClient` has the same methods as coroutines. `submit` opens the websocket under the client's own
`client_id` first, so `wait` sees every message of the prompt, from `execution_start` on:
`on_progress(kind, data)` gets each (`executing`, `progress`, ...). Without a websocket (or for a prompt
submitted under another client_id) `wait` polls `/history`. A
failed or interrupted prompt raises PromptFailed; a refused one, PromptRejected. aiohttp is imported here
only, so `import engine` stays light.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from typing import Any, Callable, Coroutine, TypeVar

import aiohttp

ProgressCallback = Callable[[str, dict[str, Any]], None]
T = TypeVar("T")
POLL_SECONDS = 0.1


class ClientError(Exception):
    """The server answered with an error status; `status` and the decoded `body` say which."""

    def __init__(self, message: str, status: int, body: Any) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class PromptRejected(ClientError):
    """`POST /prompt` refused the workflow: `body["node_errors"]` names each node's problems."""


class PromptFailed(Exception):
    """The prompt ran and failed or was interrupted; `entry` is its history entry."""

    def __init__(self, prompt_id: str, entry: dict[str, Any]) -> None:
        messages = dict((kind, data) for kind, data in entry.get("status", {}).get("messages", []))
        error = messages.get("execution_error")
        if error is not None:
            reason = f"node {error.get('node_id')} ({error.get('node_type')}) failed: " \
                     f"{error.get('exception_type')}: {error.get('exception_message')}"
        else:
            reason = "interrupted" if "execution_interrupted" in messages else "failed"
        super().__init__(f"prompt {prompt_id} {reason}")
        self.prompt_id = prompt_id
        self.entry = entry


class AsyncClient:
    def __init__(self, base_url: str, token: str | None = None, client_id: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.client_id = client_id or uuid.uuid4().hex
        self._session: aiohttp.ClientSession | None = None
        self._reader: asyncio.Task | None = None
        #: Websocket messages per prompt this client submitted, until `wait` consumes them.
        self._events: dict[str, asyncio.Queue] = {}

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
            self._session = aiohttp.ClientSession(headers=headers)
        return self._session

    async def _request(self, method: str, path: str, body: Any = None, **query: str) -> Any:
        async with self._http().request(method, self.base_url + path, json=body, params=query or None) as answer:
            payload = await answer.read()
            decoded: Any = payload
            if answer.content_type == "application/json":
                decoded = json.loads(payload)
            if answer.status >= 400:
                kind = PromptRejected if path == "/prompt" and answer.status == 400 else ClientError
                raise kind(f"{method} {path}: {answer.status} {_message(decoded)}", answer.status, decoded)
            return decoded

    async def _listen(self) -> None:
        """Keep the websocket open before submitting, so no event of a quick prompt is missed (ComfyUI's
        scripts connect first for the same reason). Without one, `wait` polls the history."""
        if self._reader is not None and not self._reader.done():
            return
        try:
            socket = await self._http().ws_connect(f"{self.base_url}/ws", params={"clientId": self.client_id})
        except (aiohttp.ClientError, ConnectionError, asyncio.TimeoutError):
            return
        self._reader = asyncio.create_task(self._read(socket))

    async def _read(self, socket: aiohttp.ClientWebSocketResponse) -> None:
        try:
            async for message in socket:
                if message.type != aiohttp.WSMsgType.TEXT:
                    continue
                decoded = json.loads(message.data)
                data = decoded.get("data") or {}
                events = self._events.get(data.get("prompt_id"))
                if events is not None:
                    events.put_nowait((decoded.get("type"), data))
        finally:
            await socket.close()
            for events in self._events.values():
                events.put_nowait(None)  # the socket is gone: waiters read the history instead

    # --- the API -----------------------------------------------------------------------------------------
    async def submit(self, workflow: dict[str, Any], client_id: str | None = None, *, front: bool = False,
                     extra_data: dict[str, Any] | None = None) -> str:
        """Queue an API-format workflow; returns its prompt_id. Raises PromptRejected when invalid."""
        prompt_id = str(uuid.uuid4())
        if client_id in (None, self.client_id):
            await self._listen()
            if self._reader is not None:
                self._events[prompt_id] = asyncio.Queue()
        body = {"prompt": workflow, "client_id": client_id or self.client_id, "front": front,
                "extra_data": extra_data or {}, "prompt_id": prompt_id}
        try:
            return (await self._request("POST", "/prompt", body))["prompt_id"]
        except BaseException:
            self._events.pop(prompt_id, None)
            raise

    async def wait(self, prompt_id: str, on_progress: ProgressCallback | None = None,
                   timeout: float | None = None) -> dict[str, Any]:
        """The prompt's history entry once it finished; PromptFailed if it failed, TimeoutError past
        `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        events = self._events.get(prompt_id)
        try:
            if events is not None:
                await asyncio.wait_for(self._follow(events, on_progress), _left(deadline))
            entry = await asyncio.wait_for(self._poll_history(prompt_id), _left(deadline))
        except asyncio.TimeoutError:
            raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout} s") from None
        self._events.pop(prompt_id, None)
        if entry["status"].get("status_str") != "success":
            raise PromptFailed(prompt_id, entry)
        return entry

    @staticmethod
    async def _follow(events: asyncio.Queue, on_progress: ProgressCallback | None) -> None:
        while (message := await events.get()) is not None:
            kind, data = message
            if on_progress is not None:
                on_progress(kind, data)
            if kind == "executing" and data.get("node") is None:
                return

    async def _poll_history(self, prompt_id: str) -> dict[str, Any]:
        while not (entry := await self.history(prompt_id)):
            await asyncio.sleep(POLL_SECONDS)
        return entry[prompt_id]

    async def images(self, prompt_id: str, as_pil: bool = False) -> list[Any]:
        """Every image the prompt's output nodes list (`images` entries), as bytes or PIL images."""
        entry = (await self.history(prompt_id)).get(prompt_id)
        if entry is None:
            raise KeyError(f"prompt {prompt_id} is not in the history")
        found = []
        for ui in entry["outputs"].values():
            for image in ui.get("images", []):
                found.append(await self.view(image["filename"], image.get("subfolder", ""),
                                             image.get("type", "output")))
        if as_pil:
            import io
            from PIL import Image
            return [Image.open(io.BytesIO(content)) for content in found]
        return found

    async def view(self, filename: str, subfolder: str = "", kind: str = "output") -> bytes:
        return await self._request("GET", "/view", filename=filename, subfolder=subfolder, type=kind)

    async def history(self, prompt_id: str | None = None) -> dict[str, Any]:
        return await self._request("GET", "/history" + (f"/{prompt_id}" if prompt_id else ""))

    async def queue(self) -> dict[str, Any]:
        return await self._request("GET", "/queue")

    async def interrupt(self, prompt_id: str | None = None) -> None:
        await self._request("POST", "/interrupt", {"prompt_id": prompt_id} if prompt_id else {})

    async def cancel(self, prompt_ids: list[str]) -> None:
        """Take pending prompts out of the queue (a running one is stopped with `interrupt`)."""
        await self._request("POST", "/queue", {"delete": prompt_ids})

    async def object_info(self, node_class: str | None = None) -> dict[str, Any]:
        return await self._request("GET", "/object_info" + (f"/{node_class}" if node_class else ""))


class Client:
    """AsyncClient's methods as plain calls, run on a private event loop thread; `on_progress` callbacks
    run on that thread."""

    def __init__(self, base_url: str, token: str | None = None, client_id: str | None = None) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sdgraph-client", daemon=True)
        self._thread.start()
        self._async = AsyncClient(base_url, token, client_id)

    @property
    def client_id(self) -> str:
        return self._async.client_id

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._call(self._async.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def submit(self, workflow: dict[str, Any], client_id: str | None = None, *, front: bool = False,
               extra_data: dict[str, Any] | None = None) -> str:
        return self._call(self._async.submit(workflow, client_id, front=front, extra_data=extra_data))

    def wait(self, prompt_id: str, on_progress: ProgressCallback | None = None,
             timeout: float | None = None) -> dict[str, Any]:
        return self._call(self._async.wait(prompt_id, on_progress, timeout))

    def images(self, prompt_id: str, as_pil: bool = False) -> list[Any]:
        return self._call(self._async.images(prompt_id, as_pil))

    def view(self, filename: str, subfolder: str = "", kind: str = "output") -> bytes:
        return self._call(self._async.view(filename, subfolder, kind))

    def history(self, prompt_id: str | None = None) -> dict[str, Any]:
        return self._call(self._async.history(prompt_id))

    def queue(self) -> dict[str, Any]:
        return self._call(self._async.queue())

    def interrupt(self, prompt_id: str | None = None) -> None:
        self._call(self._async.interrupt(prompt_id))

    def cancel(self, prompt_ids: list[str]) -> None:
        self._call(self._async.cancel(prompt_ids))

    def object_info(self, node_class: str | None = None) -> dict[str, Any]:
        return self._call(self._async.object_info(node_class))


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _message(body: Any) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message", body["error"]))
    return body.decode(errors="replace")[:300] if isinstance(body, bytes) else str(body)[:300]
