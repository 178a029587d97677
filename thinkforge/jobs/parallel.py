"""Data parallelism applied to a built model: DDP for small models, FSDP2 for large ones.

The training loop never asks which strategy runs. ``build_model`` returns a model ready to
train; the pieces it composes each do one thing:

    strategy = resolve_strategy(cfg.resources.strategy, hf_config, cfg, world, device)
    model = build_model(model_dir, strategy=strategy, device=device, world=world,
                        param_dtype=torch.bfloat16, activation_checkpointing=True,
                        load_weights=True)
    clip_grad_norm(model, 1.0)              # a plain float, whatever the strategy

FSDP2 (``fully_shard``): the model is built on the meta device (no memory), each decoder
layer and then the root are sharded over a 1-D ``DeviceMesh`` (nccl on GPU, gloo on CPU),
storage is allocated for this rank's shards only, and each rank reads only its rows of
every weight from the safetensors files. No rank ever holds the whole model. With
``param_dtype`` set, ``MixedPrecisionPolicy(param_dtype, reduce_dtype=float32)`` computes in
16 bits over fp32 sharded master weights.

DDP: every rank loads the whole model (``from_pretrained``) and Ray Train wraps it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
from pathlib import Path
from typing import Any, Literal

import torch

from thinkforge.jobs.config import LoRA
from thinkforge.jobs.lora import apply_lora, hf_name, init_lora_weights
from thinkforge.jobs.memory import ModelShape, choose_strategy

__all__ = [
    "apply_activation_checkpointing",
    "apply_fsdp",
    "build_model",
    "clip_grad_norm",
    "gradient_sync",
    "is_sharded",
    "load_sharded_weights",
    "reshard",
    "resolve_strategy",
]

Strategy = Literal["ddp", "fsdp"]


def resolve_strategy(
    requested: str,
    hf_config: Any,
    *,
    world: int,
    device: torch.device,
    block_size: int,
    micro_batch_size: int,
    mixed_precision: bool,
    activation_checkpointing: bool,
) -> Strategy:
    """``ddp``/``fsdp`` as asked; ``auto`` through ``memory.choose_strategy`` with this
    worker's memory (rank 0's answer, broadcast, so every rank takes the same path)."""
    if requested != "auto":
        return "fsdp" if requested == "fsdp" else "ddp"
    choice: Strategy = choose_strategy(
        ModelShape.from_config(hf_config),
        world_size=world,
        capacity_bytes=_worker_memory(device),
        block_size=block_size,
        micro_batch_size=micro_batch_size,
        mixed_precision=mixed_precision,
        activation_checkpointing=activation_checkpointing,
    )
    if world > 1:
        import torch.distributed as dist

        box: list[Any] = [choice]
        dist.broadcast_object_list(box, src=0)
        choice = box[0]
    return choice


def _worker_memory(device: torch.device) -> float:
    """The accelerator's memory, or on CPU this host's memory split between its workers."""
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return host / max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def build_model(
    model_dir: str,
    *,
    strategy: Strategy,
    device: torch.device,
    world: int,
    param_dtype: torch.dtype | None = None,
    activation_checkpointing: bool = False,
    cpu_offload: bool = False,
    layers_per_unit: int = 1,
    load_weights: bool = True,
    lora: LoRA | None = None,
) -> Any:
    """The model ready to train. ``load_weights=False`` leaves the (sharded) weights for a
    checkpoint to fill; DDP then still loads them, as it needs the structure anyway.
    ``lora``: adapter layers on a frozen base (``thinkforge.jobs.lora``), added before
    the model is wrapped or sharded."""
    if strategy == "ddp":
        import ray.train.torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model.config.use_cache = False
        if lora is not None:
            model = apply_lora(model, lora)
        if activation_checkpointing:
            apply_activation_checkpointing(model)
        return ray.train.torch.prepare_model(model, parallel_strategy="ddp")
    model = _meta_model(model_dir)
    if lora is not None:
        model = apply_lora(model, lora)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    apply_fsdp(
        model,
        device=device,
        world=world,
        param_dtype=param_dtype,
        cpu_offload=cpu_offload,
        layers_per_unit=layers_per_unit,
    )
    model.to_empty(device="cpu" if cpu_offload else device)
    _init_buffers(model)
    if load_weights:
        load_sharded_weights(model, model_dir)
        if lora is not None:
            init_lora_weights(model)
    return model


def _meta_model(model_dir: str) -> Any:
    """The architecture with no storage: parameters and buffers on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    config.use_cache = False
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def apply_activation_checkpointing(model: Any) -> None:
    """Recompute each decoder layer in the backward pass (non-reentrant, FSDP-safe)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def apply_fsdp(
    model: Any,
    *,
    device: torch.device,
    world: int,
    param_dtype: torch.dtype | None = None,
    cpu_offload: bool = False,
    layers_per_unit: int = 1,
) -> None:
    """``fully_shard`` the decoder layers, ``layers_per_unit`` consecutive layers to a
    unit (one all-gather and one reduce-scatter each), then the root (embeddings, norm,
    head). Larger units mean fewer, larger collectives, which gloo runs synchronously
    (bench/README.md: 2 layers a unit took FSDP2 from 0.74x to 0.84x of DDP's tokens/s
    in a 2-process CPU run), at the cost of holding a whole unit gathered at a time."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world,))
    kwargs: dict[str, Any] = {"mesh": mesh}
    if param_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=param_dtype, reduce_dtype=torch.float32
        )
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    layers = list(_decoder_layers(model))
    groups = [layers[i : i + layers_per_unit] for i in range(0, len(layers), layers_per_unit)]
    # Every unit but the last reshards after forward (the default): a forward without
    # backward, as in validation, then leaves little unsharded behind, and ``reshard``
    # puts back the rest. The last unit and the root (FSDP2 keeps the root gathered by
    # itself) keep their parameters: backward starts with them, so resharding would only
    # gather them again at once (torchtitan does the same). One more unit held through
    # the head and loss, one all-gather fewer per step.
    for group in groups:
        # A list of modules is one unit: one state and one parameter group for them all.
        fully_shard(
            group[0] if len(group) == 1 else group,
            reshard_after_forward=group is not groups[-1],
            **kwargs,
        )
    fully_shard(model, **kwargs)
    if device.type == "cpu":
        units = [model] + [group[0] for group in groups]
        for unit in units:
            unit.set_custom_all_gather(_AllGatherByExchange())
            unit.set_custom_reduce_scatter(_ReduceScatterByExchange())
        # On CPU FSDP2 has no streams to overlap with: its all-gathers run where they are
        # issued and block. Issued asynchronously instead (gloo moves the bytes on its
        # own threads), each unit's forward starts the next unit's all-gather, and
        # backward's default prefetch of the previous unit no longer blocks. One more
        # unit is held gathered in forward, as backward's prefetch already does.
        model._set_unshard_async_op(True)
        for unit, following in itertools.pairwise(units):
            unit.set_modules_to_forward_prefetch([following])


# gloo's all-gather and reduce-scatter are several times slower than point-to-point
# transfers of the same bytes (2 processes, 124 MB per rank, loaded machine: 1.1-3.2 s and
# 0.8-2.8 s, against 0.3-0.7 s for an all-reduce of twice the bytes; bench/README.md), and
# FSDP2 runs one of each per unit and step. On CPU both are done as gloo sends and
# receives straight between the buffers FSDP2 already holds: no zero-filled halves, no
# extra summing, and each rank sends its share once (an all-reduce sends the whole
# buffer, twice the bytes of an all-gather or reduce-scatter).


class _PlainBuffers:
    """FSDP2's custom collectives allocate their buffers here: plain CPU tensors."""

    def allocate(self, size: Any, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)


class _Transfers(torch.distributed.Work):
    """Sends and receives in flight, as the one ``Work`` FSDP2 waits on."""

    def __init__(self, transfers: list[Any]) -> None:
        super().__init__()
        self._transfers = transfers

    def wait(self, timeout: Any = None) -> bool:
        for transfer in self._transfers:
            transfer.wait()
        self._transfers = []
        return True


# Distinct tags keep an all-gather in flight apart from a reduce-scatter on the same pair.
_ALL_GATHER_TAG, _REDUCE_SCATTER_TAG = 1, 2


class _AllGatherByExchange(_PlainBuffers):
    """FSDP2's all-gather: each rank sends its shard to every other rank and receives
    theirs into their slots of the output. Exact: only copies. With ``async_op`` the
    transfers are left in flight for FSDP2 to wait on before it copies out."""

    def __call__(
        self,
        output_tensor: torch.Tensor,
        input_tensor: torch.Tensor,
        group: Any,
        async_op: bool = False,
    ) -> Any:
        import torch.distributed as dist

        world, rank = dist.get_world_size(group), dist.get_rank(group)
        slots = output_tensor.view(world, -1)
        if slots[rank].data_ptr() != input_tensor.data_ptr():  # FSDP2 copies it in already
            slots[rank].copy_(input_tensor.view(-1))
        transfers: list[Any] = []  # gloo's Work objects (None only off the group)
        for peer in range(world):
            if peer != rank:
                transfers.append(
                    dist.isend(slots[rank], group=group, group_dst=peer, tag=_ALL_GATHER_TAG)
                )
                transfers.append(
                    dist.irecv(slots[peer], group=group, group_src=peer, tag=_ALL_GATHER_TAG)
                )
        work = _Transfers(transfers)
        if async_op:
            return work
        work.wait()
        return None  # done: FSDP2 then copies out at once


class _ReduceScatterByExchange(_PlainBuffers):
    """FSDP2's reduce-scatter as a ring over the gradient buffer FSDP2 holds: at each of
    ``world - 1`` steps a rank sends one partial chunk on and adds the one it receives,
    in the output, which ends as this rank's chunk summed over all ranks. No memory
    beyond FSDP2's buffers. Ops other than sum and average go to gloo's own."""

    def __call__(
        self,
        output_tensor: torch.Tensor,
        input_tensor: torch.Tensor,
        group: Any,
        op: Any,
        async_op: bool = False,
    ) -> Any:
        import torch.distributed as dist

        ReduceOp = dist.ReduceOp
        if op not in (ReduceOp.SUM, ReduceOp.AVG):
            return dist.reduce_scatter_tensor(
                output_tensor, input_tensor, op=op, group=group, async_op=async_op
            )
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        chunks, out = input_tensor.view(world, -1), output_tensor.view(-1)
        right, left = (rank + 1) % world, (rank - 1) % world
        for step in range(world - 1):
            # Sends the partial sum of chunk rank-step-1, receives chunk rank-step-2's;
            # the last one received is this rank's own chunk.
            sent: Any = dist.isend(
                chunks[(rank - step - 1) % world],
                group=group,
                group_dst=right,
                tag=_REDUCE_SCATTER_TAG,
            )
            received: Any = dist.irecv(out, group=group, group_src=left, tag=_REDUCE_SCATTER_TAG)
            received.wait()
            sent.wait()
            if step < world - 2:
                chunks[(rank - step - 2) % world].add_(out)
        out.add_(chunks[rank])
        if op == ReduceOp.AVG:
            out.div_(world)
        return None


def _decoder_layers(model: Any) -> Any:
    """The decoder layers, inside a ``PeftModel`` too."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.model.layers


def _init_buffers(model: Any) -> None:
    """Buffers computed at construction (rotary frequencies) are garbage after
    ``to_empty``; the model's own initializer recomputes them. Only parameter-free
    modules are touched, so no weight is re-initialised."""
    for module in model.modules():
        if next(module.parameters(recurse=False), None) is None and any(
            True for _ in module.buffers(recurse=False)
        ):
            model._init_weights(module)


def _weight_files(model_dir: str) -> dict[str, Path]:
    """Tensor name -> safetensors file of a Hugging Face directory (or hub id, offline)."""
    root = Path(model_dir)
    if not root.is_dir():
        from huggingface_hub import snapshot_download

        root = Path(snapshot_download(model_dir, local_files_only=True))
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: root / file for name, file in weight_map.items()}
    from safetensors import safe_open

    single = root / "model.safetensors"
    with safe_open(single, framework="pt") as fh:
        return dict.fromkeys(fh.keys(), single)


def load_sharded_weights(model: Any, model_dir: str) -> None:
    """Copy each rank's rows of every parameter straight from the safetensors files."""
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    files = _weight_files(model_dir)
    # A LoRA model's base weights under their names in the files; its adapter is not there.
    params = {hf_name(n): p for n, p in model.named_parameters() if ".lora_" not in n}
    missing = sorted(set(params) - set(files))
    if missing:
        raise ValueError(f"{model_dir} has no weights for {', '.join(missing[:5])}")
    by_file: dict[Path, list[str]] = {}
    for name in params:
        by_file.setdefault(files[name], []).append(name)
    with torch.no_grad():
        for path, names in by_file.items():
            with safe_open(path, framework="pt") as fh:
                for name in names:
                    param = params[name]
                    local = param.to_local() if isinstance(param, DTensor) else param
                    if isinstance(param, DTensor):
                        shape, offset = compute_local_shape_and_global_offset(
                            param.shape, param.device_mesh, param.placements
                        )
                        index = tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))
                    else:
                        index = ()
                    if local.numel():
                        local.copy_(fh.get_slice(name)[index])


def reshard(model: Any) -> None:
    """Put FSDP parameters back into their shards. The root keeps its parameters gathered
    after a forward for the backward to come; after a forward with no backward
    (validation, a probe) its parameters would otherwise not be the optimizer's."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def is_sharded(model: Any) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def gradient_sync(model: Any, syncing: bool) -> contextlib.AbstractContextManager[Any]:
    """Skip DDP's all-reduce on all but the last micro-batch of a step. FSDP2 reduces
    every micro-batch into sharded gradients instead: holding unsharded ones would cost
    the memory it exists to save."""
    if syncing or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()  # type: ignore[no-any-return]


def clip_grad_norm(model: Any, max_norm: float) -> float:
    """Clip by the global gradient norm; sharded gradients are reduced across ranks."""
    from torch.distributed.tensor import DTensor

    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return float(norm)
