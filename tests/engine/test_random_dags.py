"""Property: random DAGs of toy nodes evaluate to what a direct recursive evaluation gives, cached or not."""
from __future__ import annotations

from functools import cache

from hypothesis import given, settings
from hypothesis import strategies as st

import toy_nodes
from engine import Executor, Registry, ResultCache

REGISTRY = Registry()
REGISTRY.load_module(toy_nodes)
# One cache shared by every example: graphs that repeat sub-graphs of earlier ones (under other ids) hit it,
# so a signature that confused two different sub-graphs would show up as a wrong value.
SHARED = Executor(REGISTRY, cache=ResultCache(max_entries=200))
OPERATIONS = {"Add": lambda a, b: a + b, "Multiply": lambda a, b: a * b}


@st.composite
def dags(draw):
    size = draw(st.integers(1, 9))
    ids = draw(st.lists(st.text("abc123:", min_size=1, max_size=3), min_size=size + 3, max_size=size + 3,
                        unique=True))
    nodes = []
    for index in range(size):
        if index == 0 or draw(st.booleans()) and draw(st.booleans()):
            nodes.append(("Constant", {"value": draw(st.integers(-5, 5))}))
            continue
        operand = st.one_of(st.integers(-3, 3), st.integers(0, index - 1).map(lambda j: ("link", j)))
        nodes.append((draw(st.sampled_from(sorted(OPERATIONS))), {"a": draw(operand), "b": draw(operand)}))
    outputs = draw(st.lists(st.integers(0, size - 1), min_size=1, max_size=3))
    return ids, nodes, outputs


def to_prompt(ids, nodes, outputs):
    def api(value):
        return [ids[value[1]], 0] if isinstance(value, tuple) else value
    prompt = {ids[i]: {"class_type": cls, "inputs": {k: api(v) for k, v in inputs.items()}}
              for i, (cls, inputs) in enumerate(nodes)}
    for k, target in enumerate(outputs):
        prompt[ids[len(nodes) + k]] = {"class_type": "Output", "inputs": {"value": [ids[target], 0]}}
    return prompt


def direct_values(ids, nodes, outputs):
    @cache
    def value_of(index):
        class_type, inputs = nodes[index]
        if class_type == "Constant":
            return inputs["value"]
        operands = [value_of(v[1]) if isinstance(v, tuple) else v for v in (inputs["a"], inputs["b"])]
        return OPERATIONS[class_type](*operands)
    return {ids[len(nodes) + k]: {"value": [value_of(target)]} for k, target in enumerate(outputs)}


@settings(max_examples=80, deadline=None)
@given(dags())
def test_random_dag_matches_direct_evaluation_cached_or_not(dag):
    prompt, expected = to_prompt(*dag), direct_values(*dag)
    uncached = Executor(REGISTRY, cache=ResultCache(max_entries=0)).execute(prompt)
    assert uncached.outputs == expected
    fresh = Executor(REGISTRY, cache=ResultCache())
    assert fresh.execute(prompt).outputs == expected
    again = fresh.execute(prompt)
    assert (again.outputs, again.executed) == (expected, ())
    assert SHARED.execute(prompt).outputs == expected


@settings(max_examples=40, deadline=None)
@given(dags())
def test_each_node_runs_after_all_of_its_sources(dag):
    prompt = to_prompt(*dag)
    result = Executor(REGISTRY, cache=ResultCache(max_entries=0)).execute(prompt)
    position = {node_id: i for i, node_id in enumerate(result.executed)}
    for node_id in result.executed:
        for value in prompt[node_id]["inputs"].values():
            if isinstance(value, list):
                assert position[value[0]] < position[node_id]
