"""ModelManager: LRU offloading within a byte budget, checked with a recording mover (no GPU needed)."""
import pytest
import torch
from torch import nn

from diffusion.memory import ModelManager, weight_bytes


def model_of(n_floats: int) -> nn.Module:
    return nn.Linear(n_floats, 1, bias=False)  # n_floats * 4 bytes of fp32 weight


class RecordingMover:
    def __init__(self):
        self.moves: list[tuple[str, str]] = []
        self.names: dict[int, str] = {}

    def name(self, model: nn.Module, name: str) -> nn.Module:
        self.names[id(model)] = name
        return model

    def __call__(self, model: nn.Module, device: torch.device) -> None:
        self.moves.append((self.names[id(model)], device.type))


@pytest.fixture
def mover():
    return RecordingMover()


@pytest.fixture
def abc(mover):
    return [mover.name(model_of(100), name) for name in "abc"]  # 400 bytes each


def test_weight_bytes_counts_parameters_and_buffers_once():
    model = nn.BatchNorm1d(10)  # weight, bias, running_mean, running_var (fp32) + num_batches_tracked (int64)
    model.shared = model.weight
    assert weight_bytes(model) == 4 * 10 * 4 + 8


def test_models_that_fit_all_stay_resident(mover, abc):
    manager = ModelManager("cuda", budget_bytes=1200, mover=mover)
    for model in abc:
        manager.load_to_device([model])
    assert manager.resident == abc
    assert mover.moves == [("a", "cuda"), ("b", "cuda"), ("c", "cuda")]


def test_least_recently_used_model_is_offloaded_first(mover, abc):
    a, b, c = abc
    manager = ModelManager("cuda", budget_bytes=800, mover=mover)
    manager.load_to_device([a])
    manager.load_to_device([b])
    manager.load_to_device([a])  # touch a: b is now least recently used
    manager.load_to_device([c])
    assert manager.resident == [a, c]
    assert mover.moves == [("a", "cuda"), ("b", "cuda"), ("b", "cpu"), ("c", "cuda")]


def test_resident_bytes_never_exceed_budget(mover):
    models = [mover.name(model_of(100 * (i + 1)), str(i)) for i in range(5)]
    manager = ModelManager("cuda", budget_bytes=2000, mover=mover)
    for model in [*models, *models[::-1], models[2], models[4]]:
        manager.load_to_device([model])
        assert manager.resident_bytes <= 2000
        assert manager.is_resident(model)


def test_models_requested_together_do_not_evict_each_other(mover, abc):
    a, b, c = abc
    manager = ModelManager("cuda", budget_bytes=800, mover=mover)
    manager.load_to_device([a])
    manager.load_to_device([b, c])
    assert manager.resident == [b, c]
    assert ("a", "cpu") in mover.moves and ("b", "cpu") not in mover.moves


def test_pinned_model_survives_while_in_use(mover, abc):
    a, b, c = abc
    manager = ModelManager("cuda", budget_bytes=800, mover=mover)
    with manager.use(a):
        manager.load_to_device([b])
        manager.load_to_device([c])  # a is older than b, but pinned: b goes
        assert manager.resident == [a, c]
    manager.load_to_device([b])  # after the block a is the least recently used again
    assert manager.resident == [c, b]


def test_already_resident_model_is_not_moved_again(mover, abc):
    manager = ModelManager("cuda", budget_bytes=1200, mover=mover)
    manager.load_to_device([abc[0]])
    manager.load_to_device([abc[0]])
    assert mover.moves == [("a", "cuda")]


def test_free_offloads_everything_unpinned(mover, abc):
    a, b, c = abc
    manager = ModelManager("cuda", budget_bytes=1200, mover=mover)
    manager.load_to_device(abc)
    with manager.use(b):
        manager.free(unload=True)
        assert manager.resident == [b]
    assert sorted(m for m in mover.moves if m[1] == "cpu") == [("a", "cpu"), ("c", "cpu")]


def test_free_without_unload_keeps_models(mover, abc):
    manager = ModelManager("cuda", budget_bytes=1200, mover=mover)
    manager.load_to_device(abc)
    manager.free(unload=False)
    assert manager.resident == abc


def test_budget_from_free_memory_minus_reserve_counts_resident_weights(mover, abc):
    # The device reports what is free now; weights we already hold are ours to reassign.
    free = {"bytes": 1000}
    manager = ModelManager("cuda", reserve_bytes=200, mover=mover, free_bytes=lambda device: free["bytes"])
    manager.load_to_device([abc[0]])
    free["bytes"] -= 400
    assert manager.budget() == 800
    manager.load_to_device([abc[1]])
    free["bytes"] -= 400
    manager.load_to_device([abc[2]])
    assert manager.resident == abc[1:]


def test_oversized_model_is_still_loaded_after_offloading_the_rest(mover, abc, caplog):
    big = mover.name(model_of(1000), "big")
    manager = ModelManager("cuda", budget_bytes=1200, mover=mover)
    manager.load_to_device(abc)
    manager.load_to_device([big])
    assert manager.resident == [big]
    assert "over the budget" in caplog.text


def test_default_mover_moves_real_parameters():
    model = model_of(4)
    manager = ModelManager("meta", budget_bytes=1 << 20)
    manager.load_to_device([model])
    assert model.weight.device.type == "meta"


def test_free_cuda_memory_counts_blocks_the_allocator_caches(monkeypatch):
    # After a run torch keeps freed activations reserved; the driver reports them as used, but they are
    # ours to reuse, so offloading models to make room for them would be wrong (ComfyUI counts them too).
    from diffusion import memory

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1_000, 10_000))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 5_000)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 3_000)
    assert memory._free_device_bytes(torch.device("cuda:0")) == 1_000 + (5_000 - 3_000)


def test_manager_does_not_keep_a_dropped_model_alive(mover, abc):
    # The model cache decides lifetimes: a model it drops must leave the device at once, not sit there until
    # LRU pressure copies it to CPU only to discard it.
    import gc
    import weakref

    manager = ModelManager("cuda", budget_bytes=1200, mover=mover)
    manager.load_to_device(abc)
    dropped = weakref.ref(abc[1])
    del abc[1]
    gc.collect()
    assert dropped() is None
    assert manager.resident == abc and manager.resident_bytes == 800
    assert [move for move in mover.moves if move[1] == "cpu"] == []
