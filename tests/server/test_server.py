"""The HTTP and websocket API against a real server on loopback, spoken the way ComfyUI's clients speak it."""
from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from live_server import LiveServer, get_json, png_bytes, post_json, queue_and_collect, run, toy_prompt, wait_for_history


def test_object_info_describes_registered_nodes_under_both_prefixes(live_server: LiveServer) -> None:
    status, info = run(get_json(live_server, "/object_info"))
    _, api_info = run(get_json(live_server, "/api/object_info"))
    assert status == 200 and info == api_info
    assert info["Constant"]["input"]["required"]["value"] == ["INT", {"default": 0, "min": -1000, "max": 1000}]
    assert info["Output"]["output_node"] is True
    _, one = run(get_json(live_server, "/object_info/Add"))
    assert list(one) == ["Add"] and one["Add"]["output"] == ["INT"]


def test_a_prompt_runs_with_comfyui_event_order_and_lands_in_history(live_server: LiveServer) -> None:
    queued, messages, _ = run(queue_and_collect(live_server, toy_prompt(2)))
    kinds = [m["type"] for m in messages if m["type"] != "status"]
    assert kinds == ["execution_start", "execution_cached", "executing", "executing", "executing", "executed",
                     "execution_success", "executing"]
    assert messages[0] == {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}},
                                                      "sid": "tester"}}
    executed = next(m for m in messages if m["type"] == "executed")
    assert executed["data"] == {"node": "3", "display_node": "3", "output": {"value": [5]},
                                "prompt_id": queued["prompt_id"]}
    assert queued["node_errors"] == {}
    entry = run(wait_for_history(live_server, queued["prompt_id"]))
    assert entry["outputs"] == {"3": {"value": [5]}}
    assert entry["status"]["status_str"] == "success" and entry["status"]["completed"] is True
    assert [kind for kind, _ in entry["status"]["messages"]] == ["execution_start", "execution_cached",
                                                                 "execution_success"]
    assert entry["prompt"][1] == queued["prompt_id"] and entry["prompt"][4] == ["3"]


def test_a_rerun_is_served_from_cache(live_server: LiveServer) -> None:
    run(queue_and_collect(live_server, toy_prompt(2)))
    _, messages, _ = run(queue_and_collect(live_server, toy_prompt(2)))
    cached = next(m for m in messages if m["type"] == "execution_cached")
    assert sorted(cached["data"]["nodes"]) == ["1", "2", "3"]


def test_an_invalid_prompt_is_refused_with_node_errors_and_never_queued(live_server: LiveServer) -> None:
    prompt = toy_prompt(2)
    prompt["1"]["inputs"]["value"] = 5000
    prompt["2"]["inputs"]["b"] = "three"
    status, answer = run(post_json(live_server, "/prompt", {"prompt": prompt}))
    assert status == 400
    assert answer["error"]["type"] == "prompt_outputs_failed_validation"
    errors = {(node_id, e["type"], e["extra_info"]["input_name"])
              for node_id, entry in answer["node_errors"].items() for e in entry["errors"]}
    assert ("1", "value_bigger_than_max", "value") in errors
    assert ("2", "invalid_input_type", "b") in errors
    _, queue = run(get_json(live_server, "/queue"))
    assert queue == {"queue_running": [], "queue_pending": []}
    assert run(get_json(live_server, "/history"))[1] == {}


def test_a_body_that_is_not_a_prompt_gets_invalid_prompt(live_server: LiveServer) -> None:
    status, answer = run(post_json(live_server, "/prompt", {"prompt": ["not", "an", "object"]}))
    assert status == 400 and answer["error"]["type"] == "invalid_prompt" and answer["node_errors"] == {}


def test_a_failing_node_fails_its_prompt_only_and_the_server_serves_the_next(live_server: LiveServer) -> None:
    failing = {"1": {"class_type": "Fail", "inputs": {"value": 1, "message": "kaput"}},
               "2": {"class_type": "Output", "inputs": {"value": ["1", 0]}}}
    queued, messages, _ = run(queue_and_collect(live_server, failing))
    error = next(m for m in messages if m["type"] == "execution_error")["data"]
    assert (error["node_id"], error["node_type"], error["exception_type"]) == ("1", "Fail", "RuntimeError")
    assert error["exception_message"] == "kaput" and any("kaput" in line for line in error["traceback"])
    entry = run(wait_for_history(live_server, queued["prompt_id"]))
    assert entry["status"]["status_str"] == "error" and entry["status"]["completed"] is False
    _, after, _ = run(queue_and_collect(live_server, toy_prompt(7)))
    assert next(m for m in after if m["type"] == "executed")["data"]["output"] == {"value": [10]}


def test_interrupt_stops_the_running_prompt_inside_a_node(live_server: LiveServer) -> None:
    slow = {"1": {"class_type": "Wait", "inputs": {"value": 1, "ticks": 500}},
            "2": {"class_type": "Output", "inputs": {"value": ["1", 0]}}}

    async def scenario() -> list[dict[str, Any]]:
        messages = []
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{live_server.url}/ws?clientId=stopper") as socket:
                await session.post(f"{live_server.url}/prompt", json={"prompt": slow, "client_id": "stopper"})
                while True:
                    message = await socket.receive(10)
                    if message.type == aiohttp.WSMsgType.BINARY:
                        continue
                    messages.append(json.loads(message.data))
                    if messages[-1]["type"] == "progress" and messages[-1]["data"]["value"] == 3:
                        await session.post(f"{live_server.url}/interrupt")
                    if messages[-1]["type"] == "executing" and messages[-1]["data"]["node"] is None:
                        return messages
    messages = run(scenario())
    interrupted = [m for m in messages if m["type"] == "execution_interrupted"]
    assert len(interrupted) == 1 and interrupted[0]["data"]["node_id"] == "1"
    progress = [m["data"]["value"] for m in messages if m["type"] == "progress"]
    assert progress[:3] == [1, 2, 3] and max(progress) < 500


def test_progress_ticks_and_binary_previews_reach_the_client(live_server: LiveServer) -> None:
    prompt = {"1": {"class_type": "Wait", "inputs": {"value": 4, "ticks": 3}},
              "2": {"class_type": "Output", "inputs": {"value": ["1", 0]}}}
    queued, messages, frames = run(queue_and_collect(live_server, prompt))
    progress = [m["data"] for m in messages if m["type"] == "progress"]
    assert progress == [{"value": step, "max": 3, "prompt_id": queued["prompt_id"], "node": "1"}
                        for step in (1, 2, 3)]
    assert frames == [(1).to_bytes(4, "big") + (2).to_bytes(4, "big") + b"fake-png-bytes"]


def test_events_go_only_to_the_submitting_client(live_server: LiveServer) -> None:
    async def scenario() -> list[str]:
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{live_server.url}/ws?clientId=bystander") as bystander:
                await run_other_client()
                seen = []
                while True:
                    try:
                        message = await bystander.receive(0.3)
                    except asyncio.TimeoutError:
                        return seen
                    seen.append(json.loads(message.data)["type"])

    async def run_other_client() -> None:
        await queue_and_collect(live_server, toy_prompt(11), client_id="owner")
    seen = run(scenario())
    assert set(seen) == {"status"}


def test_view_serves_outputs_and_refuses_paths_outside_the_folders(live_server: LiveServer) -> None:
    output = live_server.settings.output_dir
    (output / "sub").mkdir(parents=True, exist_ok=True)
    (output / "sub" / "picture.png").write_bytes(b"\x89PNG fake")
    (live_server.settings.output_dir.parent / "secret.txt").write_text("private")

    async def fetch(query: str) -> tuple[int, bytes, str]:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{live_server.url}/view?{query}") as answer:
                return answer.status, await answer.read(), answer.content_type
    assert run(fetch("filename=picture.png&subfolder=sub&type=output")) == (200, b"\x89PNG fake", "image/png")
    assert run(fetch("filename=../secret.txt&type=output"))[0] == 403
    assert run(fetch("filename=secret.txt&subfolder=..&type=output"))[0] == 403
    assert run(fetch("filename=%2Fetc%2Fpasswd&type=output"))[0] == 403
    assert run(fetch("filename=picture.png&type=elsewhere"))[0] == 403
    assert run(fetch("filename=missing.png&type=output"))[0] == 404


def test_upload_keeps_identical_files_and_renames_clashes(live_server: LiveServer) -> None:
    async def upload(content: bytes, name: str = "cat.png", **fields: str) -> dict[str, Any]:
        form = aiohttp.FormData()
        form.add_field("image", content, filename=name, content_type="image/png")
        for key, value in fields.items():
            form.add_field(key, value)
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{live_server.url}/upload/image", data=form) as answer:
                assert answer.status == 200, await answer.text()
                return await answer.json()
    one, two, three, evil = (png_bytes((shade, 0, 0)) for shade in (1, 2, 3, 4))
    assert run(upload(one)) == {"name": "cat.png", "subfolder": "", "type": "input"}
    assert run(upload(one))["name"] == "cat.png"
    assert run(upload(two))["name"] == "cat (1).png"
    assert run(upload(three, overwrite="true"))["name"] == "cat.png"
    assert (live_server.settings.input_dir / "cat.png").read_bytes() == three
    assert (live_server.settings.input_dir / "cat (1).png").read_bytes() == two
    escaped = run(upload(evil, name="../../evil.png"))["name"]
    assert "/" not in escaped and (live_server.settings.input_dir / escaped).read_bytes() == evil
    assert not (live_server.settings.input_dir.parent / "evil.png").exists()


def test_cross_origin_requests_are_refused(live_server: LiveServer) -> None:
    status, _ = run(post_json(live_server, "/prompt", {"prompt": toy_prompt()}, Origin="http://evil.example"))
    assert status == 403
    host = live_server.url.removeprefix("http://")
    status, _ = run(get_json(live_server, "/object_info", Origin=f"http://{host}"))
    assert status == 200


def test_a_loopback_server_refuses_host_names_other_than_its_own(live_server: LiveServer) -> None:
    # DNS rebinding: a page on evil.example whose name now resolves to 127.0.0.1 sends matching Origin and Host.
    port = live_server.url.rsplit(":", 1)[1]
    rebound = {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"}
    status, text = run(post_json(live_server, "/prompt", {"prompt": toy_prompt()}, **rebound))
    assert status == 403 and "--allow-host evil.example" in text
    assert run(get_json(live_server, "/object_info", Host=f"localhost:{port}"))[0] == 200


def test_allowed_hosts_cover_loopback_names_and_extras_only_on_loopback() -> None:
    from server import allowed_hosts_for
    assert allowed_hosts_for("127.0.0.1", ["sd.example"]) == {"localhost", "127.0.0.1", "::1", "sd.example"}
    assert "::1" in allowed_hosts_for("::1") and "localhost" in allowed_hosts_for("localhost")
    assert allowed_hosts_for("0.0.0.0") is None and allowed_hosts_for("192.168.1.20") is None


def test_queue_front_delete_and_remaining(live_server: LiveServer) -> None:
    slow = {"1": {"class_type": "Wait", "inputs": {"value": 1, "ticks": 200}},
            "2": {"class_type": "Output", "inputs": {"value": ["1", 0]}}}

    async def scenario() -> tuple[Any, Any, Any]:
        first = (await post_json(live_server, "/prompt", {"prompt": slow}))[1]
        while not (await get_json(live_server, "/queue"))[1]["queue_running"]:
            await asyncio.sleep(0.01)
        back = (await post_json(live_server, "/prompt", {"prompt": toy_prompt(1)}))[1]
        front = (await post_json(live_server, "/prompt", {"prompt": toy_prompt(2), "front": True}))[1]
        queue = (await get_json(live_server, "/queue"))[1]
        remaining = (await get_json(live_server, "/prompt"))[1]
        await post_json(live_server, "/queue", {"delete": [back["prompt_id"]]})
        after_delete = (await get_json(live_server, "/queue"))[1]
        await post_json(live_server, "/interrupt", {"prompt_id": first["prompt_id"]})
        return (first, back, front), (queue, remaining), after_delete
    (first, back, front), (queue, remaining), after_delete = run(scenario())
    assert [item[1] for item in queue["queue_running"]] == [first["prompt_id"]]
    assert [item[1] for item in queue["queue_pending"]] == [front["prompt_id"], back["prompt_id"]]
    assert remaining == {"exec_info": {"queue_remaining": 3}}
    assert [item[1] for item in after_delete["queue_pending"]] == [front["prompt_id"]]


def test_models_routes_list_model_folders(live_server: LiveServer) -> None:
    checkpoints = live_server.settings.models_dir / "checkpoints" / "sd15"
    checkpoints.mkdir(parents=True)
    (checkpoints / "tiny.safetensors").write_bytes(b"")
    (checkpoints / "notes.txt").write_text("not a model")
    assert "checkpoints" in run(get_json(live_server, "/models"))[1]
    assert run(get_json(live_server, "/models/checkpoints")) == (200, ["sd15/tiny.safetensors"])
    assert run(get_json(live_server, "/models/nonsense"))[0] == 404


def test_system_stats_reports_python_and_a_device(live_server: LiveServer) -> None:
    status, stats = run(get_json(live_server, "/system_stats"))
    assert status == 200 and stats["system"]["python_version"].startswith("3.")
    assert stats["devices"] and stats["devices"][0]["type"] in ("cpu", "cuda")


def test_combo_options_and_validation_use_the_servers_models_folder(live_server: LiveServer) -> None:
    toys = live_server.settings.models_dir / "toys"
    toys.mkdir(parents=True)
    (toys / "mine.toy").write_text("toy")
    _, info = run(get_json(live_server, "/object_info/PickToyFile"))
    assert info["PickToyFile"]["input"]["required"]["name"][0] == ["mine.toy"]
    prompt = {"1": {"class_type": "PickToyFile", "inputs": {"name": "mine.toy"}},
              "2": {"class_type": "Output", "inputs": {"value": ["1", 0]}}}
    _, messages, _ = run(queue_and_collect(live_server, prompt))
    assert next(m for m in messages if m["type"] == "executed")["data"]["output"] == {"value": ["mine.toy"]}
    prompt["1"]["inputs"]["name"] = "theirs.toy"
    status, answer = run(post_json(live_server, "/prompt", {"prompt": prompt}))
    assert status == 400 and answer["node_errors"]["1"]["errors"][0]["type"] == "value_not_in_list"


def test_history_is_written_before_the_client_hears_the_prompt_finished(live_server: LiveServer) -> None:
    # ComfyUI's example client reads /history/{id} as soon as `executing` with node null arrives.
    state = live_server.state
    deliver = state._post
    recorded_at_finish = []

    def watching(client_id: Any, message: Any) -> None:
        if isinstance(message, dict) and message["type"] == "executing" and message["data"]["node"] is None:
            recorded_at_finish.append(state.queue.history_entry(message["data"]["prompt_id"]) != {})
        deliver(client_id, message)
    state._post = watching
    _, messages, _ = run(queue_and_collect(live_server, toy_prompt(3)))
    assert recorded_at_finish == [True]
    assert [m["type"] for m in messages][-2:] == ["execution_success", "executing"]


def test_prompt_invalid_when_its_turn_comes_fails_and_still_finishes_for_the_client(live_server: LiveServer) -> None:
    toy = live_server.settings.models_dir / "toys" / "mine.toy"
    toy.parent.mkdir(parents=True)
    toy.write_text("toy")
    slow = {"1": {"class_type": "Wait", "inputs": {"value": 1, "ticks": 500}},
            "2": {"class_type": "Output", "inputs": {"value": ["1", 0]}}}
    loader = {"1": {"class_type": "PickToyFile", "inputs": {"name": "mine.toy"}},
              "2": {"class_type": "Output", "inputs": {"value": ["1", 0]}}}

    async def scenario() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{live_server.url}/ws?clientId=late") as socket:
                await session.post(f"{live_server.url}/prompt", json={"prompt": slow, "client_id": "late"})
                async with session.post(f"{live_server.url}/prompt",
                                        json={"prompt": loader, "client_id": "late"}) as answer:
                    queued = await answer.json()
                toy.unlink()  # the file goes away while the prompt waits behind the slow one
                messages = []
                while True:
                    message = await socket.receive(10)
                    if message.type == aiohttp.WSMsgType.TEXT:
                        messages.append(json.loads(message.data))
                        data = messages[-1]["data"]
                        if messages[-1]["type"] == "progress" and data["value"] == 1:
                            await session.post(f"{live_server.url}/interrupt")  # surely running: stop it
                        if messages[-1]["type"] == "executing" and data == {"node": None, "display_node": None,
                                                                            "prompt_id": queued["prompt_id"]}:
                            return queued, messages
    queued, messages = run(scenario())
    mine = [m for m in messages if m["data"].get("prompt_id") == queued["prompt_id"]]
    assert [m["type"] for m in mine] == ["execution_start", "execution_error", "executing"]
    error = mine[1]["data"]
    assert (error["node_id"], error["node_type"], error["exception_type"]) == (
        "1", "PickToyFile", "prompt_outputs_failed_validation")
    assert "value_not_in_list: name: 'mine.toy' not in []" in error["exception_message"]
    entry = run(wait_for_history(live_server, queued["prompt_id"]))
    assert entry["status"]["status_str"] == "error"
    assert [kind for kind, _ in entry["status"]["messages"]] == ["execution_start", "execution_error"]


def test_null_origin_is_refused(live_server: LiveServer) -> None:
    # Sandboxed iframes and data: pages send `Origin: null`; letting them through defeats the origin check.
    status, _ = run(post_json(live_server, "/prompt", {"prompt": toy_prompt()}, Origin="null"))
    assert status == 403


def test_upload_without_a_file_name_is_a_bad_request(live_server: LiveServer) -> None:
    async def upload(name: str) -> int:
        form = aiohttp.FormData()
        form.add_field("image", b"data", filename=name, content_type="image/png")
        form.add_field("overwrite", "true")
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{live_server.url}/upload/image", data=form) as answer:
                return answer.status
    assert run(upload("")) == 400
    assert run(upload(".")) == 400
    assert list(live_server.settings.input_dir.iterdir()) == []


def test_view_serves_only_media_inline_and_everything_else_as_a_download(live_server: LiveServer) -> None:
    # An uploaded page or SVG opened through /view would run its script with the server's origin.
    inputs = live_server.settings.input_dir
    (inputs / "page.html").write_text("<script>fetch('/prompt')</script>")
    (inputs / "drawing.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'><script>1</script></svg>")
    (inputs / "photo.png").write_bytes(b"\x89PNG fake")

    async def headers(name: str) -> tuple[str, str, str]:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{live_server.url}/view?filename={name}&type=input") as answer:
                assert answer.status == 200
                return (answer.headers["Content-Type"], answer.headers["Content-Disposition"],
                        answer.headers["X-Content-Type-Options"])
    assert run(headers("page.html")) == ("application/octet-stream", 'attachment; filename="page.html"', "nosniff")
    assert run(headers("drawing.svg")) == ("application/octet-stream", 'attachment; filename="drawing.svg"',
                                           "nosniff")
    assert run(headers("photo.png")) == ("image/png", 'inline; filename="photo.png"', "nosniff")


def test_history_offset_minus_one_means_the_newest_entries_as_in_comfyui(live_server: LiveServer) -> None:
    first, _, _ = run(queue_and_collect(live_server, toy_prompt(1)))
    second, _, _ = run(queue_and_collect(live_server, toy_prompt(2)))
    run(wait_for_history(live_server, second["prompt_id"]))
    assert list(run(get_json(live_server, "/history?max_items=1&offset=-1"))[1]) == [second["prompt_id"]]
    assert list(run(get_json(live_server, "/history?max_items=1&offset=0"))[1]) == [first["prompt_id"]]
