"""The server under abuse: random JSON posted to /prompt, and fifty clients submitting at once."""
from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.client import AsyncClient
from live_server import LiveServer, get_json, run, toy_prompt

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda children: st.lists(children, max_size=4)
                    | st.dictionaries(st.text(max_size=8), children, max_size=4), max_leaves=20)
NODE = st.fixed_dictionaries({"class_type": st.sampled_from(["Constant", "Add", "Output", "Nope", ""]) | JSON,
                              "inputs": st.dictionaries(st.sampled_from(["value", "a", "b"]), JSON | st.tuples(
                                  st.sampled_from(["1", "2", "x"]), st.integers(-2, 3)).map(list), max_size=3)})
BODIES = st.one_of(
    JSON,
    st.fixed_dictionaries({"prompt": st.dictionaries(st.sampled_from(["1", "2", "3"]), NODE | JSON, max_size=3)},
                          optional={"client_id": JSON, "number": JSON, "front": JSON, "extra_data": JSON,
                                    "prompt_id": JSON, "partial_execution_targets": JSON}),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=BODIES)
def test_random_json_gets_a_clear_answer_and_never_breaks_the_server(live_server: LiveServer, body: Any) -> None:
    async def post() -> tuple[int, Any]:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{live_server.url}/prompt", data=json.dumps(body),
                                    headers={"Content-Type": "application/json"}) as answer:
                return answer.status, await answer.json()
    status, answer = run(post())
    assert status in (200, 400), answer
    if status == 400:
        assert isinstance(answer["error"]["message"], str) and answer["error"]["message"]
        assert isinstance(answer["node_errors"], dict)
    else:
        assert set(answer) == {"prompt_id", "number", "node_errors"}
    assert run(get_json(live_server, "/prompt"))[0] == 200


def test_fifty_concurrent_submitters_each_see_their_prompt_complete_exactly_once(live_server: LiveServer) -> None:
    async def submitter(index: int) -> tuple[str, list[Any], int]:
        async with AsyncClient(live_server.url, client_id=f"submitter{index}") as client:
            prompt_id = await client.submit(toy_prompt(index))
            finishes = []
            entry = await client.wait(prompt_id, on_progress=lambda kind, data: finishes.append(kind)
                                      if kind == "execution_success" else None, timeout=60)
            return prompt_id, entry["outputs"]["3"]["value"], len(finishes)

    async def everyone() -> list[tuple[str, list[Any], int]]:
        return await asyncio.gather(*(submitter(index) for index in range(50)))
    results = run(everyone())
    assert sorted(value[0] for _, value, _ in results) == [index + 3 for index in range(50)]
    assert [finished for _, _, finished in results] == [1] * 50
    _, history = run(get_json(live_server, "/history"))
    assert sorted(history) == sorted(prompt_id for prompt_id, _, _ in results)
    assert all(entry["status"]["status_str"] == "success" for entry in history.values())
    assert [m for entry in history.values() for m, _ in entry["status"]["messages"]].count("execution_start") == 50
