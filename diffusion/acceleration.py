"""Making one denoise step cheap on a GPU without changing what it computes.

A UNet step in eager PyTorch is bound by the host launching ~1,500 kernels, not by the GPU (performance.md:
SD1.5 costs about the same at batch 1, 2 and 8). The remedies here each keep the module's names, weights
and outputs (within fp16 rounding) and each is a switch in :class:`AccelerationOptions`:

- **CUDA-graph replay** (:class:`StepGraphs`): the step is captured once per input shape and replayed as one
  launch; captured again when shapes change or the weights move, dropped when a capture fails.
- **channels-last** convolution layout on CUDA (cuDNN's fast layout for fp16 tensor cores).
- **stacked projections**: self-attention's q/k/v (cross-attention's k/v) as one matmul over one weight
  tensor that the three parameters are views of (attention.share_one_weight).
- **torch.compile**, opt-in, with the time each compile took recorded.
- **weight streaming** (:class:`BlockStreamer`): a low-VRAM mode with one block's weights on the device.

Nothing here is specific to diffusion; the UNet (unet.py) owns a :class:`StepAccelerator` and routes its
forward through it.
"""

from __future__ import annotations

import copy
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

Step = Callable[..., Tensor]


@dataclass(frozen=True)
class AccelerationOptions:
    """Switches of one model's step; ``None`` means "on where it is known to be safe" (CUDA)."""

    cuda_graphs: bool | None = None
    channels_last: bool | None = None
    stacked_projections: bool = True
    # torch.compile mode ("default", "max-autotune-no-cudagraphs", ...); None runs eagerly. Compiling takes
    # minutes on a full-size UNet, which is why it is never on by default.
    compile_mode: str | None = None
    compile_backend: str = "inductor"
    max_graphs: int = 4  # captured shapes kept per model; each holds its static inputs and output


def memory_format_of(x: Tensor) -> torch.memory_format:
    """channels_last when ``x`` is laid out so (and is not also plain contiguous), else contiguous_format."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def to_channels_last(module: nn.Module) -> None:
    """Conv weights in NHWC order. Made outside inference mode even inside a step, so that the new weights
    stay patchable in place (a LoRA) afterwards; an inference-mode tensor would refuse the patch."""
    with torch.inference_mode(False), torch.no_grad():
        module.to(memory_format=torch.channels_last)


def _on(option: bool | None, device: torch.device) -> bool:
    return option if option is not None else device.type == "cuda"


def weights_identity(module: nn.Module) -> tuple[int, ...]:
    """Where every weight lives: a captured graph reads these addresses, so any change invalidates it.

    In-place changes (a LoRA patch copied into the weights) keep the addresses and need no recapture: the
    replay reads the current values.
    """
    return WeightSlots(module).identity()


class WeightSlots:
    """:func:`weights_identity` for every step: the walk over submodules (2 ms for an SD1.5 UNet) is done
    once; each step reads the slots afresh (about 0.2 ms), so replaced or re-assigned tensors are still seen."""

    def __init__(self, module: nn.Module) -> None:
        self._slots = [(owner._parameters, name) for owner in module.modules() for name in owner._parameters]
        self._slots += [(owner._buffers, name) for owner in module.modules() for name in owner._buffers]

    def identity(self) -> tuple[int, ...]:
        return tuple(0 if table[name] is None else table[name].data_ptr() for table, name in self._slots)


# --- CUDA graphs ---------------------------------------------------------------------------------------


class GraphBackend(Protocol):
    """Captures ``step`` (a call over fixed input tensors) and returns ``(replay, output)``.

    ``replay()`` re-runs the captured work, reading the same input tensors and writing the same ``output``.
    """

    def capture(self, step: Callable[[], Tensor]) -> tuple[Callable[[], None], Tensor]: ...


class CudaGraphBackend:
    """torch.cuda.CUDAGraph capture after a warm-up on a side stream; all graphs share one memory pool.

    Sharing is safe because the graphs of one model never run concurrently and each replay's output is
    copied out before the next replay.
    """

    warmup_runs = 2  # cuBLAS/cuDNN pick their algorithms and allocate workspaces outside the capture

    def __init__(self) -> None:
        self._pool: tuple[int, int] | None = None

    def capture(self, step: Callable[[], Tensor]) -> tuple[Callable[[], None], Tensor]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup_runs):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        # thread_local: CUDA work on another thread (the server's previews) must not void this capture.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            output = step()
        return graph.replay, output


@dataclass
class _Captured:
    inputs: tuple[Tensor | None, ...]
    replay: Callable[[], None]
    output: Tensor


def _shape_key(tensors: Sequence[Tensor | None]) -> tuple:
    return tuple(None if t is None else (tuple(t.shape), t.dtype, t.device) for t in tensors)


class StepGraphs:
    """Replays ``step(*inputs)`` from a graph captured per (shapes, dtypes, device, inference mode) and
    weight placement.

    The first call for a key captures (which runs the step, so it returns a real result); later calls copy
    the inputs into the captured input tensors, replay and return a copy of the output, so a caller that
    keeps results across steps (multistep samplers) never sees them overwritten. Up to ``max_graphs`` keys
    are kept, least recently used evicted; when the weights move, every graph is dropped. A key whose capture
    failed runs eagerly from then on, with one warning.
    """

    def __init__(self, backend: GraphBackend, max_graphs: int = 4) -> None:
        self.backend = backend
        self.max_graphs = max_graphs
        self.captures = 0  # total captures, for tests and the benchmark
        self._graphs: OrderedDict[tuple, _Captured] = OrderedDict()
        self._failed: set[tuple] = set()
        self._weights: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return len(self._graphs)

    def clear(self) -> None:
        self._graphs.clear()
        self._failed.clear()

    def __call__(self, step: Step, weights: tuple[int, ...], *inputs: Tensor | None) -> Tensor:
        if weights != self._weights:
            self.clear()
            self._weights = weights
        # Captured input tensors made under inference mode cannot be written outside it, and vice versa.
        key = (_shape_key(inputs), torch.is_inference_mode_enabled())
        if key in self._failed:
            return step(*inputs)
        captured = self._graphs.get(key)
        if captured is None:
            return self._capture(key, step, inputs)
        self._graphs.move_to_end(key)
        for static, value in zip(captured.inputs, inputs):
            if static is not None:
                static.copy_(value)
        captured.replay()
        return captured.output.clone()

    def _capture(self, key: tuple, step: Step, inputs: tuple[Tensor | None, ...]) -> Tensor:
        static = tuple(None if t is None else t.clone() for t in inputs)
        try:
            replay, output = self.backend.capture(lambda: step(*static))
        except Exception as error:  # noqa: BLE001 - any capture failure leaves the eager step correct
            log.warning("CUDA graph capture failed for inputs %s; running that shape eagerly: %s", key, error)
            self._failed.add(key)
            return step(*inputs)
        self.captures += 1
        self._graphs[key] = _Captured(static, replay, output)
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        return output.clone()


# --- the accelerator a model owns ----------------------------------------------------------------------


class AcceleratedModel(Protocol):
    """What :class:`StepAccelerator` needs from a model: its weights and how to stack its projections."""

    def parameters(self) -> Iterator[nn.Parameter]: ...

    def modules(self) -> Iterator[nn.Module]: ...

    def share_projection_weights(self) -> None: ...


@dataclass
class StepAccelerator:
    """Runs a model's eager step with the options' remedies; a plain attribute of the model, not a module
    (so ``state_dict`` is unchanged), and copied fresh (no graphs) when the model is deep-copied."""

    options: AccelerationOptions = field(default_factory=AccelerationOptions)
    graph_backend: GraphBackend | None = None  # None: CUDA graphs on a CUDA device
    streaming: bool = False  # set by BlockStreamer: weights move during the step, so nothing may be captured
    compile_seconds: dict[tuple, float] = field(default_factory=dict)  # first call per input shape, compiled
    _graphs: StepGraphs | None = field(default=None, repr=False)
    _compiled: Step | None = field(default=None, repr=False)
    _prepared_for: tuple | None = field(default=None, repr=False)
    _slots: WeightSlots | None = field(default=None, repr=False)  # the model's modules are fixed once stepped

    def __deepcopy__(self, memo: dict) -> StepAccelerator:
        return StepAccelerator(copy.deepcopy(self.options, memo), self.graph_backend)

    @property
    def graphs(self) -> StepGraphs | None:
        return self._graphs

    def configure(self, options: AccelerationOptions) -> None:
        """New options; graphs and compiled code of the old ones are dropped."""
        self.options = options
        self._graphs = None
        self._compiled = None
        self._prepared_for = None
        self._slots = None
        self.compile_seconds.clear()

    def __call__(self, model: AcceleratedModel, eager: Step, *inputs: Tensor | None) -> Tensor:
        device = inputs[0].device
        self._prepare(model, device)
        step = self._compiled_step(eager) if self.options.compile_mode else eager
        if self._graphs_apply(device):
            if self._graphs is None:
                self._graphs = StepGraphs(self.graph_backend or CudaGraphBackend(), self.options.max_graphs)
            if self._slots is None:
                self._slots = WeightSlots(model)
            return self._graphs(step, self._slots.identity(), *inputs)
        return step(*inputs)

    def _graphs_apply(self, device: torch.device) -> bool:
        if self.streaming or torch.is_grad_enabled() or self.options.compile_mode == "reduce-overhead":
            return False  # reduce-overhead mode captures its own graphs
        if self.graph_backend is not None:
            return self.options.cuda_graphs is not False
        if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
            return False
        return _on(self.options.cuda_graphs, device)

    def _prepare(self, model: AcceleratedModel, device: torch.device) -> None:
        """Layout and stacked weights, redone only when the weights were moved or replaced (cheap check)."""
        first = next(model.parameters())
        placement = (first.data_ptr(), first.dtype, device)
        if placement == self._prepared_for or first.device.type == "meta" or self.streaming:
            return  # a streamed model's weights are uploaded one by one: nothing to lay out or stack
        if _on(self.options.channels_last, device):
            to_channels_last(model)
        if self.options.stacked_projections:
            model.share_projection_weights()
        self._prepared_for = (next(model.parameters()).data_ptr(), first.dtype, device)

    def _compiled_step(self, eager: Step) -> Step:
        if self._compiled is None:
            compiled = torch.compile(eager, mode=self.options.compile_mode, backend=self.options.compile_backend,
                                     dynamic=False)

            def timed(*inputs: Tensor | None) -> Tensor:
                key = _shape_key(inputs)
                if key in self.compile_seconds:
                    return compiled(*inputs)
                started = time.perf_counter()
                output = compiled(*inputs)
                self.compile_seconds[key] = time.perf_counter() - started
                log.info("torch.compile (%s) for inputs %s took %.1f s", self.options.compile_mode, key,
                         self.compile_seconds[key])
                return output

            self._compiled = timed
        return self._compiled


# --- low-VRAM weight streaming -------------------------------------------------------------------------

Copier = Callable[[Tensor, torch.device], Tensor]


def copy_to_device(tensor: Tensor, device: torch.device) -> Tensor:
    # From pinned host memory the copy is asynchronous, so the next block's upload overlaps this one's work.
    return tensor.to(device, non_blocking=True)


class BlockStreamer:
    """While entered, each block's weights are put on ``device`` just before it runs and dropped after.

    The weights' home copies stay where they are (pinned when streaming to CUDA, so uploads overlap
    compute); a block's device copies are released as soon as its forward returns, so the device holds one
    block's weights at a time. Parameters keep their identity and names, so patches and ``state_dict``
    still see the home copies. ``copier`` is injectable, which lets CPU tests stand in for a device.
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        device: torch.device | str,
        *,
        copier: Copier = copy_to_device,
        accelerator: StepAccelerator | None = None,
    ) -> None:
        self.blocks = list(blocks)
        self.device = torch.device(device)
        self.copier = copier
        self.accelerator = accelerator
        self.uploaded_bytes = 0  # per entry, for the benchmark's cost figure
        self._homes: dict[int, list[tuple[nn.Module, str, bool, Tensor]]] = {}
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> BlockStreamer:
        pin = self.device.type == "cuda" and torch.cuda.is_available()
        for block in self.blocks:
            homes = []
            for owner in block.modules():
                for name, tensor in list(owner._parameters.items()) + list(owner._buffers.items()):
                    if tensor is None:
                        continue
                    is_parameter = name in owner._parameters
                    if pin and tensor.device.type == "cpu" and not tensor.is_pinned():
                        with torch.inference_mode(False):  # the home copy must stay patchable in place
                            _put(owner, name, is_parameter, tensor.detach().pin_memory())
                    homes.append((owner, name, is_parameter, _get(owner, name, is_parameter)))
            self._homes[id(block)] = homes
            self._hooks.append(block.register_forward_pre_hook(self._upload))
            self._hooks.append(block.register_forward_hook(self._release))
        if self.accelerator is not None:
            self.accelerator.streaming = True
        return self

    def __exit__(self, *exc: object) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for homes in self._homes.values():
            for owner, name, is_parameter, home in homes:
                _put(owner, name, is_parameter, home)
        self._homes.clear()
        if self.accelerator is not None:
            self.accelerator.streaming = False

    def _upload(self, block: nn.Module, args: tuple) -> None:
        for owner, name, is_parameter, home in self._homes[id(block)]:
            _put(owner, name, is_parameter, self.copier(home, self.device))
            self.uploaded_bytes += home.numel() * home.element_size()

    def _release(self, block: nn.Module, args: tuple, output: object) -> None:
        for owner, name, is_parameter, home in self._homes[id(block)]:
            _put(owner, name, is_parameter, home)


def _get(owner: nn.Module, name: str, is_parameter: bool) -> Tensor:
    return owner._parameters[name].data if is_parameter else owner._buffers[name]


def _put(owner: nn.Module, name: str, is_parameter: bool, tensor: Tensor) -> None:
    if is_parameter:
        owner._parameters[name].data = tensor
    else:
        owner._buffers[name] = tensor

