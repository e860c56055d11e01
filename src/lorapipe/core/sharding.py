"""train.fsdp: the frozen base sharded across the processes with torch's FSDP2
(`fully_shard`), the LoRA kept whole on every process.

Why by hand and not accelerate's FSDP plugin: accelerate turns FSDP on only for GPU-type
distributed runs (on CPU processes it falls back to DDP, state.py), and its FSDP checkpoints
save every model whole. lorapipe runs under accelerate's launcher and process group either
way (gloo on CPUs, NCCL on GPUs) and calls torch's FSDP2 itself, on the same blocks
accelerate's auto-wrap would pick (each model's `_no_split_modules`).

The LoRA's parameters are left out of the sharding (`ignored_params`): they are small, so
every process keeps them whole and its optimizer state as a plain process would, and
checkpoints, the best-step copy and the exports stay what they are without a gather.
FSDP2 does not reduce what it ignores, so their gradients are averaged here, as DDP would
(average_gradients). Every forward of a sharded model is collective: evaluations and
samples run on every process (the same inputs on each, so the same numbers); the main
process alone logs and writes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lorapipe.core.errors import LorapipeError

# said where a run asks for accelerate's own FSDP (by the launch, and at set-up for a run
# launched by hand)
ACCELERATE_FSDP = ("it turns on accelerate's FSDP (distributed_type: FSDP), which runs only "
                   "on GPUs and saves whole models; set train.fsdp: true instead (lorapipe "
                   "shards the frozen base itself and saves the LoRA alone) and give the "
                   "config another distributed_type (MULTI_GPU)")


def block_classes(model: torch.nn.Module) -> set[str]:
    """The class names the model says must not be split (transformers' and diffusers'
    `_no_split_modules`: decoder layers, transformer blocks), peft's wrapper looked through."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return names


def shard(models: dict[str, torch.nn.Module], trainable: list[torch.nn.Parameter],
          device: torch.device, world: int) -> int:
    """fully_shard each block (bottom-up: a block's full weights are moved to `device` and
    cut to this process's share one block at a time), then each model's root; the LoRA
    (`trainable`) is left whole and put on `device`. Returns the number of sharded units."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    keep = set(trainable)
    units = 0
    for name, model in models.items():
        blocks = block_classes(model)
        if not blocks:
            raise LorapipeError(
                f"train.fsdp: {name} ({type(model).__name__}) names no blocks to shard "
                "(_no_split_modules); set train.fsdp: false")
        # deepest first: fully_shard on a module manages the parameters no inner unit took
        inner = [m for m in model.modules() if type(m).__name__ in blocks]
        for module in reversed(inner):
            fully_shard(module, mesh=mesh, ignored_params=keep)
            units += 1
        # the root unit: the model generate() calls (peft's wrapper has one of its own),
        # resharded after its forward too (FSDP2 keeps a root's weights gathered by
        # default, and a main-process-only state_dict(), the best-step copy, reshards
        # them on that process alone: the processes' next collectives would differ)
        root = model.get_base_model() if hasattr(model, "get_base_model") else model
        fully_shard(root, mesh=mesh, ignored_params=keep, reshard_after_forward=True)
        units += 1
        model.to(device)  # the ignored LoRA (the sharded parts are there already)
        _keep_output_capture(model)
    return units


def _keep_output_capture(model: torch.nn.Module) -> None:
    """fully_shard gives each unit a subclass of its own (FSDPCLIPTextModel), and
    transformers looks up what a model records (`output_hidden_states`: SDXL's penultimate
    CLIP layer) by the class's name, so a sharded CLIP would return no hidden states; the
    sharded classes are registered as their originals were."""
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # a transformers without the registry finds them by itself
        return
    for module in model.modules():
        record = getattr(module, "_can_record_outputs", None)
        if record and not _CAN_RECORD_REGISTRY.get(module):
            _CAN_RECORD_REGISTRY[module] = record


def broadcast(params: list[torch.nn.Parameter]) -> None:
    """The main process's LoRA to every process (DDP does this when it wraps a model): the
    same seed builds the same LoRA everywhere, and this makes it so whatever built it."""
    with torch.no_grad():
        for param in params:
            dist.broadcast(param.data, 0)


def average_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    """The mean over processes of the LoRA's gradients, in one all-reduce (a parameter with
    no gradient on this process counts as zero there, as it does in DDP's buckets)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for param, grad in zip(params, grads, strict=True):
        n = grad.numel()
        param.grad = flat[offset:offset + n].view_as(param).to(grad.dtype)
        offset += n
