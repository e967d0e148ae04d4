"""Result caching: content-addressed signatures, re-execution sets, fingerprints and the LRU budget."""
from __future__ import annotations

import pytest

from engine import Executor, ResultCache
from engine.cache import canonical, estimate_nbytes, signature
from toy_nodes import Blob, build_prompt

GRAPH = build_prompt(("1", "Constant", {"value": 2}), ("2", "Constant", {"value": 3}),
                     ("3", "Add", {"a": ["1", 0], "b": ["2", 0]}), ("4", "Multiply", {"a": ["3", 0], "b": 10}),
                     ("5", "Output", {"value": ["4", 0]}), ("6", "Output", {"value": ["2", 0]}))


def with_input(raw, node_id, name, value):
    changed = {k: {**v, "inputs": dict(v["inputs"])} for k, v in raw.items()}
    changed[node_id]["inputs"][name] = value
    return changed


def renamed(raw, prefix):
    def rename(value):
        return [prefix + value[0], value[1]] if isinstance(value, list) else value
    return {prefix + k: {**v, "inputs": {n: rename(x) for n, x in v["inputs"].items()}} for k, v in raw.items()}


def test_second_identical_run_executes_nothing(executor, events):
    first = executor.execute(GRAPH)
    events.clear()
    second = executor.execute(GRAPH)
    assert second.executed == ()
    assert second.outputs == first.outputs == {"5": {"value": [50]}, "6": {"value": [3]}}
    assert events.of("execution_cached")[0].nodes == ["1", "2", "3", "4", "5", "6"]
    assert [e.node for e in events.of("executed")] == ["5", "6"]
    assert events.kinds() == ["execution_start", "execution_cached", "executed", "executed", "execution_success",
                              "executing"]


def test_changing_one_constant_reruns_exactly_that_node_and_its_descendants(executor):
    executor.execute(GRAPH)
    result = executor.execute(with_input(GRAPH, "1", "value", 7))
    assert sorted(result.executed) == ["1", "3", "4", "5"]
    assert result.outputs == {"5": {"value": [100]}, "6": {"value": [3]}}


def test_changing_a_downstream_constant_reruns_only_downstream(executor):
    executor.execute(GRAPH)
    assert executor.execute(with_input(GRAPH, "4", "b", 11)).executed == ("4", "5")


def test_equal_constant_spelled_differently_still_hits(executor):
    executor.execute(GRAPH)
    assert executor.execute(with_input(GRAPH, "1", "value", "2")).executed == ()


def test_identical_subgraph_under_other_ids_hits(executor):
    executor.execute(GRAPH)
    bigger = {**renamed(GRAPH, "x"), "9": {"class_type": "Output", "inputs": {"value": ["x3", 0]}}}
    result = executor.execute(bigger)
    assert result.executed == ("9",)
    assert result.outputs["x5"] == {"value": [50]}


def test_node_asking_for_its_id_is_keyed_by_it(executor):
    raw = build_prompt(("1", "WhoAmI", {"value": 1}), ("2", "Output", {"value": ["1", 0]}))
    executor.execute(raw)
    assert executor.execute(renamed(raw, "n")).executed == ("n1", "n2")
    assert executor.execute(raw).executed == ()


def test_uncacheable_node_and_its_dependents_rerun_every_time(executor):
    raw = build_prompt(("1", "Constant", {"value": 1}), ("2", "Volatile", {"value": ["1", 0]}),
                       ("3", "Add", {"a": ["2", 0]}), ("4", "Output", {"value": ["3", 0]}),
                       ("5", "Output", {"value": ["1", 0]}))
    executor.execute(raw)
    assert executor.execute(raw).executed == ("2", "3", "4")


def test_always_rerun_fingerprint_reruns_the_node(executor):
    raw = build_prompt(("1", "AlwaysRerun", {"value": 1}), ("2", "Output", {"value": ["1", 0]}))
    executor.execute(raw)
    assert executor.execute(raw).executed == ("1", "2")


def test_fingerprint_of_a_file_reruns_when_its_content_changes(executor, settings):
    settings.input_dir.mkdir(parents=True)
    note = settings.input_dir / "note.txt"
    note.write_text("one")
    raw = build_prompt(("1", "ReadText", {"name": "note.txt"}), ("2", "Output", {"value": ["1", 0]}))
    executor.execute(raw)
    assert executor.execute(raw).executed == ()
    note.write_text("two")
    result = executor.execute(raw)
    assert result.executed == ("1", "2")
    assert result.outputs == {"2": {"value": ["two"]}}


def test_failing_fingerprint_fails_the_prompt_at_that_node(executor):
    result = executor.execute(build_prompt(("1", "ReadText", {"name": "absent.txt"}),
                                           ("2", "Output", {"value": ["1", 0]})))
    assert (result.status, result.error.node_id, result.error.exception_type) == ("error", "1", "FileNotFoundError")


def test_clear_empties_the_cache(executor):
    executor.execute(GRAPH)
    executor.cache.clear()
    assert len(executor.cache) == 0 and executor.cache.total_bytes == 0
    assert len(executor.execute(GRAPH).executed) == 6


def test_zero_entry_cache_disables_caching(registry, settings):
    executor = Executor(registry, cache=ResultCache(max_entries=0), settings=settings)
    executor.execute(GRAPH)
    assert len(executor.execute(GRAPH).executed) == 6


def test_entry_budget_evicts_least_recently_used():
    cache = ResultCache(max_entries=2)
    cache.put("a", (1,))
    cache.put("b", (2,))
    assert cache.get("a").outputs == (1,)  # "a" is now the most recent
    cache.put("c", (3,))
    assert ("a" in cache, "b" in cache, "c" in cache) == (True, False, True)


def test_byte_budget_evicts_until_it_fits():
    cache = ResultCache(max_entries=None, max_bytes=2500)
    for key in "abc":
        cache.put(key, (Blob(1000),))
    assert [k in cache for k in "abc"] == [False, True, True]
    assert cache.total_bytes == 2000
    assert cache.put("huge", (Blob(3000),)) is False
    assert "huge" not in cache and cache.total_bytes == 2000


def test_result_larger_than_the_byte_budget_reruns_each_time(registry, settings):
    executor = Executor(registry, cache=ResultCache(max_bytes=1500), settings=settings)
    raw = build_prompt(("1", "MakeBlob", {"size": 2000}), ("2", "MakeBlob", {"size": 500}))
    executor.execute(raw, targets=["1", "2"])
    assert executor.execute(raw, targets=["1", "2"]).executed == ("1",)
    assert executor.cache.total_bytes == 500


def test_cached_results_survive_eviction_within_the_same_run(registry, settings):
    executor = Executor(registry, cache=ResultCache(max_entries=1), settings=settings)
    assert executor.execute(GRAPH).outputs == {"5": {"value": [50]}, "6": {"value": [3]}}


def test_estimate_nbytes_uses_cache_nbytes_then_nbytes_then_recurses():
    class Handle:
        nbytes = 999

        def cache_nbytes(self) -> int:
            return 7
    shared = Blob(100)
    assert estimate_nbytes(Handle()) == 7
    assert estimate_nbytes({"samples": Blob(64), "noise_mask": [Blob(16), (Blob(4),)]}) == 84
    assert estimate_nbytes((shared, shared)) == 100


def test_signature_ignores_dict_order_and_distinguishes_types():
    first = signature("Add", {"a": 1, "b": {"x": 1, "y": 2}}, {})
    assert first == signature("Add", {"b": {"y": 2, "x": 1}, "a": 1}, {})
    assert first != signature("Add", {"a": 1.0, "b": {"x": 1, "y": 2}}, {})
    assert signature("Add", {}, {"a": ("s1", 0)}) != signature("Add", {}, {"a": ("s1", 1)})


def test_canonical_refuses_values_without_a_stable_form():
    assert canonical({"k": (b"\x01", {2, 1})}) == {"dict": [["k", [{"bytes": "01"}, {"set": [1, 2]}]]]}
    with pytest.raises(TypeError, match="cannot build a cache key from a object"):
        canonical(object())
