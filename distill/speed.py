"""Speed options of the training step: channels-last memory format, ``torch.compile`` of the backbone and encoder,
fused AdamW and EMA updates, and three reorderings of the decoder's work (top-k recompute, level sums, split
attention). None changes the arithmetic beyond float rounding (tests/distill/test_speed_options.py compares a
step with the options on and off; the decoder ones are equal in float64 in tests/students). :meth:`SpeedOptions.off`
is the official computation, in the official order.

``channels_last`` (default on): the student's 4-d weights and the batch in NHWC. oneDNN convolutions then run on
the tensors as they are; in NCHW they reorder input, weights and output into a blocked layout and back on every
call, forward and backward. Linear layers and attention do not care. With it the feature concatenations of the
encoder and decoder hand their inputs dense channels-last gradients (:func:`students.layers.cat_dense_grads`).

``compile`` (default off): ``torch.compile`` of the backbone and encoder (:func:`compile_regions`): of a plain run the
two whole modules; where the run captures a feature tap inside one, the largest modules around that tap. The
DSI taps are forward hooks registered for each step, and dynamo does not see hooks registered after it traced a
module (it would keep the stale ones silently): so only ``forward`` methods are compiled, the hooks of the
compiled module itself run around it, and no tapped module lies inside a compiled one.
The decoder stays eager: its top-k selection and denoising queries change from batch to batch. Runs with
multi-scale batches compile with dynamic spatial sizes, so every size shares one graph; the compilation is paid
once, up front, by :func:`warm_up` on a dummy batch, and the engine logs its time.

``fused_optimizer`` (default on): AdamW's fused kernel (one call per parameter tensor instead of a dozen
elementwise ops; on CUDA the ``foreach`` kernels are torch's own default already), and the EMA update as one
``lerp`` per tensor instead of a multiply and an add (:class:`distill.ema.ModelEMA`).

``recompute_topk`` (default on): the decoders' query selection (``students.decoder_blocks``) ranks every encoder
token without autograd and computes the chosen top-k rows again with it. Only those rows reach a loss, so values
and gradients are the official all-token computation's, while the backward skips the projection and score head
of the other ~96% of the tokens (measured on a DEIM-D-FINE-S CPU step at 640, batch 2, interleaved A/B: 1-3% of
the step, 3% of its peak memory). The valid-anchor mask is applied to the chosen rows only, and those rows and the
decoder's per-level value maps come out of one autograd node (``students.decoder_blocks.value_and_rows``) whose
backward writes the memory's gradient in one pass.

``level_sums`` (default on): the deformable cross-attention of every decoder weighs and sums each level's samples
as it goes and adds the levels (``students.decoder_blocks.deformable_attention_core``,
``students.rtdetrv2_decoder.deformable_sampling``); the official code concatenates every level's samples into one
``(B*heads) x head_dim x Q x P`` tensor first. The same sum in another order (relative differences ~1e-7), without
that tensor and its backward.

``split_attention`` (default on): the decoder self-attention in training, whose denoising mask lets the matching
queries see only each other, runs as an unmasked matching x matching product plus a masked product for the
denoising rows (``students.decoder_blocks.decoder_self_attention``) instead of one masked product over all
queries: every query's softmax covers the same keys, about a third of the products are skipped.

``keep_host_memory`` (default on; acts on a CPU device): glibc's allocator keeps the memory a step frees for the
next one (:func:`keep_freed_host_memory`) instead of handing large blocks back to the kernel and faulting fresh,
zeroed pages in again: the eager DEIM-D-FINE-S step at 640, batch 2, took 80,000-100,000 page faults a step
(~0.35 GB touched anew), 10-30% of its time on the 2-core development VM, where a fault is dear (less on bare
metal). The effect torch's own CPU launcher (``python -m torch.backends.xeon.run_cpu``)
gets by preloading jemalloc or tcmalloc, without another library. It is a setting of the whole process: the
process then keeps its peak heap.
"""

from __future__ import annotations

import ctypes
import platform
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["SpeedOptions", "batch_to", "compile_regions", "compile_student", "keep_freed_host_memory",
           "load_optimizer_state", "match_state_layout", "optimizer_kwargs", "prepare_student", "warm_up"]  # fmt: skip


@dataclass(frozen=True)
class SpeedOptions:
    """What :func:`prepare_student` and the engine apply; :meth:`off` is today's eager fp32 step."""

    channels_last: bool = True
    compile: bool = False
    fused_optimizer: bool = True
    recompute_topk: bool = True
    level_sums: bool = True
    split_attention: bool = True
    keep_host_memory: bool = True
    dynamic: bool | None = None  # compile with dynamic spatial sizes (multi-scale runs); None: dynamo decides
    backend: str = "inductor"

    @classmethod
    def from_config(cls, cfg) -> SpeedOptions:
        """The options of a :class:`distill.config.TrainConfig` (dynamic sizes when its data is multi-scale)."""
        return cls(channels_last=cfg.channels_last, compile=cfg.compile, fused_optimizer=cfg.fused_optimizer,
                   recompute_topk=cfg.recompute_topk, level_sums=cfg.level_sums,
                   split_attention=cfg.split_attention, keep_host_memory=cfg.keep_host_memory,
                   dynamic=True if cfg.data.base_size_repeat is not None else None)  # fmt: skip

    @classmethod
    def off(cls) -> SpeedOptions:
        return cls(channels_last=False, compile=False, fused_optimizer=False, recompute_topk=False, level_sums=False,
                   split_attention=False, keep_host_memory=False)


def _memory_format(options: SpeedOptions) -> torch.memory_format:
    return torch.channels_last if options.channels_last else torch.contiguous_format


def batch_to(images: torch.Tensor, options: SpeedOptions) -> torch.Tensor:
    """The batch in the memory format of the student (a no-op when it already is)."""
    return images.contiguous(memory_format=_memory_format(options)) if images.dim() == 4 else images


def optimizer_kwargs(options: SpeedOptions, device: torch.device) -> dict[str, bool]:
    """Keywords for ``torch.optim.AdamW``: ``fused`` where torch has the fused kernel for the device."""
    if not options.fused_optimizer or device.type not in ("cpu", "cuda"):
        return {}
    return {"fused": True}


def load_optimizer_state(optimizer, state: dict) -> None:
    """``optimizer.load_state_dict(state)``, keeping this run's AdamW kernel (the saved groups carry the ``fused`` /
    ``foreach`` choice of the run that wrote them, which ``load_state_dict`` would restore) and every state
    tensor in its parameter's memory layout (:func:`match_state_layout`)."""
    kernel = ("fused", "foreach")
    groups = [{**saved, **{k: now[k] for k in kernel if k in now}}
              for saved, now in zip(state["param_groups"], optimizer.param_groups)]  # fmt: skip
    optimizer.load_state_dict({**state, "param_groups": groups})
    match_state_layout(optimizer)


def match_state_layout(optimizer) -> None:
    """Give every optimizer state tensor its parameter's memory layout (call after ``load_state_dict``).

    A checkpoint written by a run in the other layout (``channels_last`` off, or before it existed) loads with the
    saved strides, and the fused AdamW kernel walks a parameter, its gradient and its state as flat buffers of
    the same order: with mismatched strides it would pair the wrong elements, silently (autograd already gives
    each gradient its parameter's strides)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


def prepare_student(student: nn.Module, options: SpeedOptions) -> None:
    """Channels-last weights (in place) and the decoders' query selection, sampling and self-attention modes.
    Compilation is separate (:func:`compile_student`): it must come after any deep copy of the student (the EMA),
    whose copy would otherwise call the original's compiled code."""
    if options.channels_last:
        student.to(memory_format=torch.channels_last)
    for module in student.modules():
        for name in ("recompute_topk", "level_sums", "split_attention"):
            if hasattr(module, name):
                setattr(module, name, getattr(options, name))


# glibc's mallopt parameters (malloc.h) and the largest mmap threshold it accepts on a 64-bit system
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -2, -3, -4
_MMAP_THRESHOLD_MAX = 32 * 2**20


def keep_freed_host_memory() -> bool:
    """Have glibc's allocator keep freed memory in the process (for the rest of its life); returns whether it
    could (False off glibc: macOS, musl).

    By default glibc serves large blocks with their own ``mmap`` and unmaps them when freed, and returns the top
    of its heap to the kernel once more than a threshold is free; a training step frees and allocates the same
    activation-sized blocks every step, so each step faults them in again as fresh zeroed pages. Here every block
    comes from the heap (no per-block ``mmap``), and up to 2 GiB of free heap stays mapped."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    settings = ((_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1),
                (_M_TOP_PAD, 256 * 2**20))  # fmt: skip
    return all(mallopt(param, value) == 1 for param, value in settings)


# ---------------------------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def _called_modules(student: nn.Module, roots: Iterable[str], size: int = 64) -> set[nn.Module]:
    """The modules under ``roots`` that a forward calls as modules (``module(x)``, not e.g. one of its methods),
    found by one dummy forward in train mode; buffers (BatchNorm statistics) and the RNG are put back."""
    called: set[nn.Module] = set()
    handles = [m.register_forward_pre_hook(lambda mod, _args: called.add(mod))
               for root in roots for m in student.get_submodule(root).modules()]  # fmt: skip
    try:
        student.dummy_tap_features(size)
    finally:
        for h in handles:
            h.remove()
    return called


def compile_regions(student: nn.Module, taps: Iterable[str] | None = None) -> list[str]:
    """Names of the submodules :func:`compile_student` compiles: under the backbone and the encoder (the roots
    themselves included), the largest modules that the forward calls as a whole, hold parameters and have none
    of the run's tapped modules inside them. ``taps``: the tap names the run captures (None: every tap the
    student declares). A tap on a region itself is fine: only the region's ``forward`` is compiled, and its
    hooks run around it."""
    names = student.taps if taps is None else list(taps)
    tapped = {student.taps[name].module for name in names}
    called = _called_modules(student, ("backbone", "encoder"))
    regions: list[str] = []

    def visit(module: nn.Module, name: str) -> None:
        if module not in called or any(t.startswith(name + ".") for t in tapped):
            for child_name, child in module.named_children():  # a tap inside, or reached through a method
                visit(child, f"{name}.{child_name}")
        elif any(True for _ in module.parameters()):
            regions.append(name)

    for root in ("backbone", "encoder"):
        visit(student.get_submodule(root), root)
    return regions


def compile_student(student: nn.Module, options: SpeedOptions, taps: Iterable[str] | None = None) -> list[str]:
    """``torch.compile`` the ``forward`` of every region of :func:`compile_regions` in place (state-dict keys
    unchanged; the student's ``compiled_regions`` names them, and its ``capture`` then refuses a tap inside one);
    returns their names. Call after any deep copy of the student."""
    regions = compile_regions(student, taps)
    # Regions of one class (HGNetv2's four stages) share one code object, and dynamo counts their graphs (one per
    # class of shapes, one more where a size turns dynamic) against one limit, past which it runs them eagerly
    # torch 2.7 renamed cache_size_limit (2.5, 2.6) to recompile_limit, keeping the old name as an alias
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 2 * len(regions)))
    for name in regions:
        module = student.get_submodule(name)
        module.forward = torch.compile(module.forward, backend=options.backend, dynamic=options.dynamic)
    student.compiled_regions = tuple(regions)
    return regions


def warm_up(student: nn.Module, batch: int, size: int, device: torch.device,
            autocast: Callable[[], AbstractContextManager] = nullcontext) -> float:
    """Compile now, on a dummy ``batch x 3 x size x size`` batch, what the first training step would: a forward
    and backward of the backbone and encoder (under ``autocast``, the step's own context, as dynamo guards on
    it). Returns the seconds. The gradients are taken with ``torch.autograd.grad``, so no ``.grad`` is written
    and no DDP hook fires; buffers (BatchNorm statistics) and the RNG are put back: the run continues exactly
    as without it."""
    saved = {k: b.clone() for k, b in student.named_buffers()}
    was_training = student.training
    student.train()  # the mode the training step runs in (dynamo guards on it)
    params = [p for p in student.parameters() if p.requires_grad]
    taps = [name for name, tap in student.taps.items() if tap.module == "encoder"]  # the encoder's outputs
    start = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), autocast():
            maps = student.tap_features(torch.rand(batch, 3, size, size, device=device), taps)
            loss = sum(m.float().square().mean() for m in maps.values())
        torch.autograd.grad(loss, params, allow_unused=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    finally:
        student.train(was_training)
        with torch.no_grad():
            for k, b in student.named_buffers():
                b.copy_(saved[k])
    return time.perf_counter() - start
