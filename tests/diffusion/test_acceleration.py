"""The step accelerations (diffusion/acceleration.py) compute what the plain path computes, on CPU.

CUDA graphs are replaced by a stand-in backend whose "replay" re-runs the step over the captured input
tensors into the captured output tensor: the same contract as a real graph, so the keying, caching,
re-capture and copy-out logic is tested exactly; only the CUDA capture itself waits for a GPU.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from diffusion.acceleration import AccelerationOptions, BlockStreamer, StepGraphs, weights_identity
from diffusion.attention import share_one_weight, stacked_weight
from diffusion.host_syncs import record_host_syncs
from diffusion.tiny_models import random_weights
from diffusion.unet import TINY_SD1_UNET, TINY_SDXL_UNET, CrossAttention, UNetModel
from diffusion.vae import TINY_VAE, AutoencoderKL

PLAIN = AccelerationOptions(cuda_graphs=False, channels_last=False, stacked_projections=False)


class RerunBackend:
    """A graph stand-in: replay re-runs the captured step on the captured inputs, into the captured output."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.captured = 0

    def capture(self, step):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.captured += 1
        output = step()

        def replay() -> None:
            output.copy_(step())

        return replay, output


def _unet(config=TINY_SD1_UNET, options=PLAIN, seed=0) -> UNetModel:
    unet = UNetModel(config).eval()
    unet.load_state_dict(random_weights(UNetModel(config, device="meta"), seed))
    return unet.accelerate(options)


def _inputs(batch=2, side=8, context_dim=32, seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, side, side, generator=generator)
    context = torch.randn(batch, 77, context_dim, generator=generator)
    return x, torch.full((batch,), 500.0), context


@pytest.fixture(scope="module")
def sd1_weights():
    return random_weights(UNetModel(TINY_SD1_UNET, device="meta"), 0)


def _twins(sd1_weights, options: AccelerationOptions) -> tuple[UNetModel, UNetModel]:
    """A plain UNet and one with ``options``, same weights."""
    plain, fast = UNetModel(TINY_SD1_UNET).eval(), UNetModel(TINY_SD1_UNET).eval()
    plain.load_state_dict(sd1_weights)
    fast.load_state_dict(sd1_weights)
    return plain.accelerate(PLAIN), fast.accelerate(options)


# --- stacked q/k/v projections ---------------------------------------------------------------------------


def test_stacked_projections_give_the_plain_output(sd1_weights):
    plain, fast = _twins(sd1_weights, AccelerationOptions(cuda_graphs=False, channels_last=False))
    with torch.inference_mode():
        expected, got = plain(*_inputs()), fast(*_inputs())
    attention = fast.input_blocks[1][1].transformer_blocks[0].attn1
    assert stacked_weight([attention.to_q, attention.to_k, attention.to_v]) is not None
    assert torch.allclose(got, expected, rtol=0, atol=1e-5 * expected.abs().max())


def test_stacked_projections_keep_state_dict_names_and_values(sd1_weights):
    _, fast = _twins(sd1_weights, AccelerationOptions(cuda_graphs=False, channels_last=False))
    with torch.inference_mode():
        fast(*_inputs())
    state = fast.state_dict()
    assert list(state) == list(sd1_weights)
    assert all(torch.equal(state[name], sd1_weights[name]) for name in sd1_weights)


def test_stacked_weight_is_a_view_of_the_parameters_not_a_copy():
    attention = CrossAttention(16, 16, heads=2, upcast=False, self_attention=True)
    attention.share_projection_weights()
    stacked = stacked_weight([attention.to_q, attention.to_k, attention.to_v])
    assert stacked.data_ptr() == attention.to_q.weight.data_ptr()
    assert torch.equal(stacked[16:32], attention.to_k.weight)


def test_an_in_place_weight_patch_reaches_the_stacked_matmul(sd1_weights):
    plain, fast = _twins(sd1_weights, AccelerationOptions(cuda_graphs=False, channels_last=False))
    with torch.inference_mode():
        fast(*_inputs())  # stacks the weights
    name = "input_blocks.1.1.transformer_blocks.0.attn1.to_k.weight"
    delta = torch.randn(plain.get_parameter(name).shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for unet in (plain, fast):
            unet.get_parameter(name).add_(delta)  # what a LoRA patch does
    with torch.inference_mode():
        expected, got = plain(*_inputs()), fast(*_inputs())
    assert torch.allclose(got, expected, rtol=0, atol=1e-5 * expected.abs().max())


def test_weights_made_under_inference_mode_stay_separate_and_correct():
    linears = [nn.Linear(8, 8, bias=False) for _ in range(3)]
    with torch.inference_mode():
        for linear in linears:
            linear.load_state_dict({"weight": torch.randn(8, 8)}, assign=True)
        share_one_weight(linears)
    assert stacked_weight(linears) is None and all(torch.is_inference(linear.weight) for linear in linears)


def test_moved_weights_are_no_longer_stacked_and_still_give_the_plain_output():
    linears = [nn.Linear(8, 8, bias=False) for _ in range(3)]
    share_one_weight(linears)
    linears[1].weight.data = linears[1].weight.data.clone()  # what Module.to does to each weight
    assert stacked_weight(linears) is None


def test_a_moved_unet_is_stacked_again_on_its_next_step(sd1_weights):
    _, fast = _twins(sd1_weights, AccelerationOptions(cuda_graphs=False, channels_last=False))
    with torch.inference_mode():
        fast(*_inputs())
    fast.to(torch.float64)  # what the model manager does, outside inference mode
    with torch.inference_mode():
        fast(*(t.double() for t in _inputs()))
    attention = fast.middle_block[1].transformer_blocks[0].attn2
    stacked = stacked_weight([attention.to_k, attention.to_v])
    assert stacked is not None and stacked.dtype == torch.float64


# --- channels-last layout --------------------------------------------------------------------------------


def test_channels_last_gives_the_plain_output(sd1_weights):
    plain, fast = _twins(sd1_weights, AccelerationOptions(cuda_graphs=False, channels_last=True))
    with torch.inference_mode():
        expected, got = plain(*_inputs()), fast(*_inputs())
    assert fast.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(got, expected, rtol=0, atol=1e-5 * expected.abs().max())


def test_channels_last_weights_made_during_an_inference_step_stay_patchable(sd1_weights):
    _, fast = _twins(sd1_weights, AccelerationOptions(cuda_graphs=False, channels_last=True))
    with torch.inference_mode():
        fast(*_inputs())
    weight = fast.input_blocks[0][0].weight
    with torch.no_grad():
        weight.add_(1.0)  # a LoRA patch, outside inference mode
    assert not torch.is_inference(weight) and weight.is_contiguous(memory_format=torch.channels_last)


def test_channels_last_is_off_on_cpu_by_default(sd1_weights):
    _, fast = _twins(sd1_weights, AccelerationOptions())
    with torch.inference_mode():
        fast(*_inputs())
    assert fast.input_blocks[0][0].weight.is_contiguous()


def test_a_channels_last_vae_decodes_as_the_plain_one():
    plain = AutoencoderKL(TINY_VAE).eval()
    plain.load_state_dict(random_weights(AutoencoderKL(TINY_VAE, device="meta"), 0))
    fast = copy.deepcopy(plain)
    plain.channels_last, fast.channels_last = False, True
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected, got = plain.decode(latent), fast.decode(latent)
    assert fast.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(got, expected, rtol=0, atol=1e-5)


# --- CUDA-graph keying and replay ------------------------------------------------------------------------


def _double_plus(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    return x * 2 + (0 if y is None else y)


def test_graphs_capture_once_per_shape_and_replay_with_new_values():
    backend = RerunBackend()
    graphs = StepGraphs(backend)
    first = graphs(_double_plus, (1,), torch.ones(2, 3))
    replayed = graphs(_double_plus, (1,), torch.full((2, 3), 5.0))
    assert backend.captured == 1
    assert torch.equal(first, torch.full((2, 3), 2.0)) and torch.equal(replayed, torch.full((2, 3), 10.0))


def test_a_new_shape_or_dtype_captures_again_and_an_old_one_replays():
    backend = RerunBackend()
    graphs = StepGraphs(backend)
    for x in (torch.ones(2, 3), torch.ones(4, 3), torch.ones(4, 3, dtype=torch.float64), torch.ones(2, 3)):
        graphs(_double_plus, (1,), x)
    assert backend.captured == 3 and len(graphs) == 3


def test_the_least_recently_used_graph_is_evicted_past_the_limit():
    backend = RerunBackend()
    graphs = StepGraphs(backend, max_graphs=2)
    for batch in (1, 2, 1, 3, 2):  # 2 was evicted by 3 (1 had been used since)
        graphs(_double_plus, (1,), torch.ones(batch, 3))
    assert backend.captured == 4 and len(graphs) == 2


def test_moved_weights_drop_every_graph_and_capture_again():
    backend = RerunBackend()
    graphs = StepGraphs(backend)
    graphs(_double_plus, (1, 2), torch.ones(2, 3))
    graphs(_double_plus, (1, 2), torch.ones(3, 3))
    graphs(_double_plus, (7, 2), torch.ones(2, 3))
    assert backend.captured == 3 and len(graphs) == 1


def test_a_result_is_not_overwritten_by_the_next_replay():
    graphs = StepGraphs(RerunBackend())
    kept = graphs(_double_plus, (1,), torch.ones(2))
    graphs(_double_plus, (1,), torch.full((2,), 3.0))
    later = graphs(_double_plus, (1,), torch.full((2,), 4.0))
    assert torch.equal(kept, torch.full((2,), 2.0)) and torch.equal(later, torch.full((2,), 8.0))


def test_an_absent_optional_input_is_part_of_the_key():
    backend = RerunBackend()
    graphs = StepGraphs(backend)
    with_y = graphs(_double_plus, (1,), torch.ones(2), torch.ones(2))
    without_y = graphs(_double_plus, (1,), torch.ones(2), None)
    assert backend.captured == 2 and with_y.tolist() == [3.0, 3.0] and without_y.tolist() == [2.0, 2.0]


def test_inference_mode_and_no_grad_calls_get_graphs_of_their_own():
    backend = RerunBackend()
    graphs = StepGraphs(backend)
    with torch.inference_mode():
        graphs(_double_plus, (1,), torch.ones(2))
    with torch.no_grad():
        result = graphs(_double_plus, (1,), torch.ones(2))
    assert backend.captured == 2 and result.tolist() == [2.0, 2.0]


def test_a_failed_capture_runs_eagerly_warns_once_and_is_not_retried(caplog):
    backend = RerunBackend(fail=True)
    graphs = StepGraphs(backend)
    with caplog.at_level(logging.WARNING, logger="diffusion.acceleration"):
        results = [graphs(_double_plus, (1,), torch.full((2,), float(v))) for v in (1, 2)]
    assert [r.tolist() for r in results] == [[2.0, 2.0], [4.0, 4.0]]
    assert len([r for r in caplog.records if "capture failed" in r.message]) == 1


def test_a_graphed_unet_gives_the_eager_output_step_after_step(sd1_weights):
    backend = RerunBackend()
    plain, fast = _twins(sd1_weights, AccelerationOptions(channels_last=False))
    fast.acceleration.graph_backend = backend
    with torch.inference_mode():
        for step in range(3):
            x, t, context = _inputs(seed=step)
            expected, got = plain(x, t * (step + 1), context), fast(x, t * (step + 1), context)
            assert torch.allclose(got, expected, rtol=0, atol=1e-5 * expected.abs().max())
    assert backend.captured == 1


def test_weights_assigned_anew_are_captured_again(sd1_weights):
    backend = RerunBackend()
    plain, fast = _twins(sd1_weights, AccelerationOptions(channels_last=False))
    fast.acceleration.graph_backend = backend
    changed = {name: tensor * 0.5 for name, tensor in sd1_weights.items()}
    with torch.inference_mode():
        fast(*_inputs())
    fast.load_state_dict({name: t.clone() for name, t in changed.items()}, assign=True)
    plain.load_state_dict(changed)
    with torch.inference_mode():
        expected, got = plain(*_inputs()), fast(*_inputs())
    assert backend.captured == 2
    assert torch.allclose(got, expected, rtol=0, atol=1e-5 * expected.abs().max())


def test_graphs_stay_off_on_cpu_and_while_gradients_are_recorded(sd1_weights):
    _, fast = _twins(sd1_weights, AccelerationOptions())
    with torch.inference_mode():
        fast(*_inputs())
    assert fast.acceleration.graphs is None
    fast.acceleration.graph_backend = RerunBackend()
    fast(*_inputs())  # grad mode on: a capture would record autograd state
    assert fast.acceleration.graphs is None


def test_the_weights_identity_changes_when_a_weight_gets_new_storage_not_when_patched_in_place(sd1_weights):
    _, unet = _twins(sd1_weights, PLAIN)
    before = weights_identity(unet)
    with torch.no_grad():
        unet.out[2].weight.add_(1.0)
    patched = weights_identity(unet)
    unet.out[2].weight.data = unet.out[2].weight.data.clone()
    assert patched == before and weights_identity(unet) != before


def test_a_deep_copied_unet_gets_a_fresh_accelerator(sd1_weights):
    _, fast = _twins(sd1_weights, AccelerationOptions(channels_last=False))
    fast.acceleration.graph_backend = RerunBackend()
    with torch.inference_mode():
        fast(*_inputs())
    twin = copy.deepcopy(fast)
    assert twin.acceleration is not fast.acceleration and twin.acceleration.graphs is None


# --- torch.compile opt-in --------------------------------------------------------------------------------


def test_compiled_step_gives_the_plain_output_and_records_compile_time(sd1_weights):
    # The "eager" backend exercises tracing and dispatch without a C++ toolchain; inductor is for the bench.
    options = AccelerationOptions(channels_last=False, compile_mode="default", compile_backend="eager")
    plain, fast = _twins(sd1_weights, options)
    with torch.inference_mode():
        expected, got = plain(*_inputs()), fast(*_inputs())
        fast(*_inputs())
    assert torch.allclose(got, expected, rtol=0, atol=1e-5 * expected.abs().max())
    assert len(fast.acceleration.compile_seconds) == 1
    assert next(iter(fast.acceleration.compile_seconds.values())) > 0


# --- fp16 VAE decode with a float32 fallback -------------------------------------------------------------


@pytest.fixture()
def overflowing_vaes():
    """A tiny VAE whose fp16 decode overflows, in float32 and in float16.

    A conv that feeds a GroupNorm is scaled 3e4: the norm undoes the scale, so the float32 image is the
    usual one, while fp16 activations overflow there (the SDXL VAE's failure, made certain).
    """
    weights = random_weights(AutoencoderKL(TINY_VAE, device="meta"), 0)
    for name in ("decoder.mid.block_1.conv1.weight", "decoder.mid.block_1.conv1.bias"):
        weights[name] = weights[name] * 3e4
    full = AutoencoderKL(TINY_VAE).eval()
    full.load_state_dict(weights)
    half = AutoencoderKL(TINY_VAE, dtype=torch.float16).eval()
    half.load_state_dict(weights)
    return full, half


def test_an_overflowing_fp16_decode_is_redone_in_float32(overflowing_vaes, caplog):
    full, half = overflowing_vaes
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), caplog.at_level(logging.WARNING, logger="diffusion.vae"):
        expected, got = full.decode(latent), half.decode(latent.half())
    assert got.dtype == torch.float16 and bool(torch.isfinite(got).all())
    assert torch.allclose(got.float(), expected, rtol=0, atol=2e-3 * expected.abs().max())
    assert any("overflowed" in record.message for record in caplog.records)
    assert half.dtype == torch.float16


def test_without_the_fallback_the_same_fp16_decode_is_not_finite(overflowing_vaes):
    _, half = overflowing_vaes
    half.upcast_on_overflow = False
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert not bool(torch.isfinite(half.decode(latent.half())).all())


# --- low-VRAM weight streaming ---------------------------------------------------------------------------


class PoisonedHomeDevice:
    """Weights at rest are NaN; "uploading" one hands back its real value (the streamer uploads each block's
    weights in the order the step runs them, so a queue in that order stands in for the device).

    A block that ran without being uploaded would turn the output into NaN, so a correct output proves every
    block was streamed; counting the blocks holding real weights as each block starts shows residency.
    """

    def __init__(self, unet: UNetModel) -> None:
        self.blocks = unet.streaming_blocks()
        self.queue = [p.detach().clone() for block in self.blocks for p in self._weights(block)]
        self.resident_counts: list[int] = []
        with torch.no_grad():
            for parameter in unet.parameters():
                parameter.fill_(float("nan"))

    @staticmethod
    def _weights(block: nn.Module) -> list[torch.Tensor]:
        return [t for owner in block.modules() for t in owner._parameters.values() if t is not None]

    def copier(self, home: torch.Tensor, device: torch.device) -> torch.Tensor:
        assert bool(home.isnan().all())
        return self.queue.pop(0)

    def watch(self) -> None:
        """Hooks that run after the streamer's upload: how many blocks hold real weights right now."""
        def count(module: nn.Module, args: tuple) -> None:
            real = [b for b in self.blocks if not bool(self._weights(b)[0].isnan().any())]
            self.resident_counts.append(len(real))
        for block in self.blocks:
            block.register_forward_pre_hook(count)


def test_streamed_weights_give_the_plain_output_with_one_block_resident(sd1_weights):
    plain, streamed = _twins(sd1_weights, AccelerationOptions())
    with torch.inference_mode():
        expected = plain(*_inputs())
    device = PoisonedHomeDevice(streamed)
    with torch.inference_mode(), streamed.stream_weights("cpu", copier=device.copier) as streamer:
        device.watch()
        got = streamed(*_inputs())
        assert streamed.acceleration.streaming
    assert torch.allclose(got, expected, rtol=0, atol=1e-6 * expected.abs().max())
    assert device.resident_counts == [1] * len(device.blocks) and device.queue == []
    assert streamer.uploaded_bytes == sum(t.numel() * 4 for t in sd1_weights.values())
    assert all(bool(p.isnan().all()) for p in streamed.parameters()) and not streamed.acceleration.streaming


def test_streaming_an_sdxl_unet_covers_its_label_embedding():
    unet = _unet(TINY_SDXL_UNET, AccelerationOptions())
    blocks = unet.streaming_blocks()
    covered = {id(p) for block in blocks for p in block.parameters()}
    assert covered == {id(p) for p in unet.parameters()} and unet.label_emb in blocks


def test_a_streamer_restores_the_home_weights_when_the_step_fails():
    linear = nn.Linear(4, 4)
    home = linear.weight.data_ptr()
    with pytest.raises(RuntimeError), BlockStreamer([linear], "cpu", copier=lambda t, d: t.clone()):
        linear(torch.ones(3, 5))  # wrong width
    assert linear.weight.data_ptr() == home


# --- no host syncs in the step ---------------------------------------------------------------------------


def test_a_unet_step_reads_nothing_back_to_the_host():
    unet = UNetModel(TINY_SDXL_UNET, device="meta").eval()
    x = torch.zeros(2, 4, 8, 8, device="meta")
    y = torch.zeros(2, TINY_SDXL_UNET.adm_in_channels, device="meta")
    with torch.inference_mode(), record_host_syncs() as found:
        unet(x, torch.full((2,), 10.0, device="meta"), torch.zeros(2, 77, 64, device="meta"), y)
    assert found == []


def test_the_sync_recorder_sees_an_item_an_upload_and_a_download():
    x = torch.zeros(3, device="meta")
    with record_host_syncs() as found:
        value = x.sum().item()
        torch.ones(3).to("meta")
        downloaded = x.to("cpu")
    assert value == 0.5 and downloaded.tolist() == [0.5] * 3
    assert [sync.read for sync in found] == ["item", "to(meta) from host", "to(cpu)"]
    assert found[0].site.startswith("tests/diffusion/test_acceleration.py:")
