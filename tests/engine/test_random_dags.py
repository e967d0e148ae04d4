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
OPERATIONS = {"Add": lambda a, b: (a + b,), "Multiply": lambda a, b: (a * b,), "DivMod": divmod}
OUTPUT_COUNT = {"Constant": 1, "Add": 1, "Multiply": 1, "DivMod": 2}


@st.composite
def dags(draw):
    size = draw(st.integers(1, 9))
    ids = draw(st.lists(st.text("abc123:", min_size=1, max_size=3), min_size=size + 3, max_size=size + 3,
                        unique=True))
    nodes = []

    def link_to_earlier(index):
        source = draw(st.integers(0, index - 1))
        return source, draw(st.integers(0, OUTPUT_COUNT[nodes[source][0]] - 1))

    for index in range(size):
        if index == 0 or draw(st.booleans()) and draw(st.booleans()):
            nodes.append(("Constant", {"value": draw(st.integers(-5, 5))}))
            continue
        class_type = draw(st.sampled_from(sorted(OPERATIONS)))
        operands = [link_to_earlier(index) if draw(st.booleans()) else draw(st.integers(-3, 3)) for _ in "ab"]
        if class_type == "DivMod":
            operands[1] = draw(st.integers(1, 4))  # a constant divisor: linked ones could be zero
        nodes.append((class_type, dict(zip("ab", operands))))
    outputs = [link_to_earlier(size) for _ in range(draw(st.integers(1, 3)))]
    return ids, nodes, outputs


def to_prompt(ids, nodes, outputs):
    def api(value):
        return [ids[value[0]], value[1]] if isinstance(value, tuple) else value
    prompt = {ids[i]: {"class_type": cls, "inputs": {k: api(v) for k, v in inputs.items()}}
              for i, (cls, inputs) in enumerate(nodes)}
    for k, target in enumerate(outputs):
        prompt[ids[len(nodes) + k]] = {"class_type": "Output", "inputs": {"value": api(target)}}
    return prompt


def direct_values(ids, nodes, outputs):
    @cache
    def values_of(index):
        class_type, inputs = nodes[index]
        if class_type == "Constant":
            return (inputs["value"],)
        return OPERATIONS[class_type](*(value(inputs[name]) for name in "ab"))

    def value(operand):
        return values_of(operand[0])[operand[1]] if isinstance(operand, tuple) else operand
    return {ids[len(nodes) + k]: {"value": [value(target)]} for k, target in enumerate(outputs)}


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
