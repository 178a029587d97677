"""Training state in and out of checkpoints: DCP for resume, a Hugging Face export to serve.

One manager owns save and load for every strategy, so the training loop does not know
which one runs:

    manager = CheckpointManager(model, optimizer, scheduler, global_batch=16,
                                strategy="fsdp", rank=rank, world=world)
    manager.save(directory, step=step)   # every rank: its shards under directory/dcp/
    manager.load(directory)              # every rank: its slices only; returns the step
    export_hf(model, directory, dtype=torch.bfloat16, max_shard_bytes=5 << 30)

Resume state goes through ``torch.distributed.checkpoint`` (DCP): model, optimizer (keyed
by parameter name, flattened), scheduler, step and RNG. Each rank writes only its own
shards (``__{rank}_0.distcp``) and reads back only the pieces it holds, so no rank ever
materialises the full optimizer state. DCP reshards on load: a checkpoint written under
DDP, FSDP or another world size loads into this job's layout. What it cannot turn into this
job's state (another architecture, another global batch, a checkpoint without DCP state)
is refused with ``CheckpointError`` (``code`` ``checkpoint_incompatible``), never loaded.

The export streams the sharded weights one tensor at a time: every rank takes part in
gathering that tensor, rank 0 writes it into the current safetensors shard and drops it.
No optimizer state is touched and rank 0 holds at most one shard of the export.

Errors:
    CheckpointError     a checkpoint this job must not resume from; the message says why
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Any

import torch

from thinkforge.jobs.checkpoints import DCP_DIR, TRAINER_STATE_FILE
from thinkforge.jobs.parallel import reshard

__all__ = ["CheckpointError", "CheckpointManager", "export_hf", "layout"]

INCOMPATIBLE = "checkpoint_incompatible"
LAYOUT_FILE = "layout.json"


class CheckpointError(ValueError):
    """A checkpoint this job must not resume from; ``code`` is the job's error code."""

    code = INCOMPATIBLE


_ARCHITECTURE = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "tie_word_embeddings",
)


def layout(model: Any, *, global_batch: int) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the architecture and the step size."""
    config = _inner(model).config.to_dict()
    keep = _ARCHITECTURE
    return {"architecture": {k: config.get(k) for k in keep}, "global_batch": global_batch}


class CheckpointManager:
    """DCP save/load of one worker's training state (see the module docstring)."""

    def __init__(
        self,
        model: Any,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        *,
        global_batch: int,
        strategy: str,
        rank: int,
        world: int,
    ) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.strategy, self.rank, self.world = strategy, rank, world
        self.layout = layout(model, global_batch=global_batch)

    def _options(self) -> Any:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        # Optimizer state keyed by parameter name: the same keys under DDP and FSDP.
        return StateDictOptions(flatten_optimizer_state_dict=True)

    def _state(self, step: int) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        reshard(self.model)
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=self._options())
        return {
            "model": model_sd,
            "optimizer": optim_sd,
            # Every rank seeds and draws alike, so one copy of the RNG serves them all.
            "trainer": {
                "step": step,
                "scheduler": self.scheduler.state_dict(),
                "rng_torch": torch.get_rng_state(),
                "rng_python": random.getstate(),
            },
        }

    def save(self, directory: str | Path, *, step: int) -> dict[str, Any]:
        """Write this rank's shards under ``directory/dcp``; returns the layout record that
        goes into the checkpoint's state file."""
        import torch.distributed.checkpoint as dcp

        target = Path(directory) / DCP_DIR
        dcp.save(self._state(step), checkpoint_id=str(target))
        written = self.layout | {"strategy": self.strategy, "world_size": self.world}
        if self.rank == 0:
            (target / LAYOUT_FILE).write_text(json.dumps(written, sort_keys=True) + "\n")
        return written

    def load(self, directory: str | Path) -> int:
        """Restore model, optimizer, scheduler and RNG; returns the step to go on from."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        root = Path(directory)
        self._check(root)
        state = self._state(0)
        try:
            dcp.load(state, checkpoint_id=str(root / DCP_DIR))
        except Exception as exc:  # DCP names the mismatching keys or shapes
            raise CheckpointError(
                f"{root.name} does not fit this model: {str(exc).splitlines()[0][:300]}"
            ) from exc
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
            options=self._options(),
        )
        trainer = state["trainer"]
        self.scheduler.load_state_dict(trainer["scheduler"])
        torch.set_rng_state(trainer["rng_torch"])
        random.setstate(trainer["rng_python"])
        return int(trainer["step"])

    def _check(self, root: Path) -> None:
        if not (root / DCP_DIR / ".metadata").is_file():
            older = (
                " (a full trainer_state.pt from an older version)"
                if (root / TRAINER_STATE_FILE).is_file()
                else ""
            )
            raise CheckpointError(
                f"{root.name} holds no sharded training state{older}; it cannot be "
                "resumed: start a new job from its exported model instead"
            )
        written = json.loads((root / DCP_DIR / LAYOUT_FILE).read_text())
        for key, mine in self.layout.items():
            theirs = written.get(key)
            if theirs != mine:
                raise CheckpointError(
                    f"{root.name} was written with {key} {theirs}, this job has {mine}: "
                    "resume it with the settings it was written with, or start a new job"
                )


def export_hf(
    model: Any,
    directory: str | Path,
    *,
    dtype: torch.dtype,
    rank: int,
    max_shard_bytes: int = 5 << 30,
) -> list[str]:
    """Write the model's weights as a Hugging Face directory in ``dtype`` (config and
    safetensors, sharded with an index past ``max_shard_bytes``). Every rank must call
    it; rank 0 writes, holding one gathered tensor at a time. Returns the weight files."""
    from torch.distributed.tensor import DTensor

    reshard(model)
    # named_parameters() lists a tied weight once: store it once, as from_pretrained expects.
    stored = {name for name, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    tensors = {k: v for k, v in model.state_dict().items() if k in stored}
    out = Path(directory)
    plan = _plan_shards(tensors, dtype, max_shard_bytes)
    for file, names in plan.items():
        with _SafetensorsStream(out / file, tensors, names, dtype, enabled=rank == 0) as stream:
            for name in names:
                value = tensors[name]
                full = value.full_tensor() if isinstance(value, DTensor) else value  # collective
                stream.write(full)
                del full
    if rank != 0:
        return []
    if len(plan) > 1:
        weight_map = {_hf_name(n): file for file, names in plan.items() for n in names}
        total = sum(_nbytes(tensors[n], dtype) for n in tensors)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    inner = _inner(model)
    config = copy.deepcopy(inner.config)
    config.dtype = dtype
    config.use_cache = True
    config.save_pretrained(out)
    if getattr(inner, "generation_config", None) is not None:
        inner.generation_config.save_pretrained(out)
    return list(plan)


def _inner(model: Any) -> Any:
    """The Hugging Face model inside a DDP wrapper (FSDP2 wraps none)."""
    return getattr(model, "module", model)


def _hf_name(name: str) -> str:
    return name.removeprefix("module.")


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    return dtype if tensor.is_floating_point() else tensor.dtype


def _nbytes(tensor: torch.Tensor, dtype: torch.dtype) -> int:
    return tensor.numel() * _cast(tensor, dtype).itemsize


def _plan_shards(
    tensors: dict[str, torch.Tensor], dtype: torch.dtype, limit: int
) -> dict[str, list[str]]:
    """File name -> tensor names, in order, each file at most ``limit`` bytes (or one
    tensor): Hugging Face's names, ``model.safetensors`` when one file holds everything."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, tensor in tensors.items():
        nbytes = _nbytes(tensor, dtype)
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    if len(groups) == 1:
        return {"model.safetensors": groups[0]}
    n = len(groups)
    return {f"model-{k:05d}-of-{n:05d}.safetensors": g for k, g in enumerate(groups, start=1)}


_SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.bool: "BOOL",
}


class _SafetensorsStream:
    """One safetensors file written tensor by tensor: the header is known from shapes and
    dtypes alone, so the data can follow as each tensor is gathered, then be dropped."""

    def __init__(
        self,
        path: Path,
        tensors: dict[str, torch.Tensor],
        names: list[str],
        dtype: torch.dtype,
        *,
        enabled: bool,
    ) -> None:
        self.path, self.dtype, self.enabled = path, dtype, enabled
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name in names:
            t = tensors[name]
            end = offset + _nbytes(t, dtype)
            header[_hf_name(name)] = {
                "dtype": _SAFETENSORS_DTYPES[_cast(t, dtype)],
                "shape": list(t.shape),
                "data_offsets": [offset, end],
            }
            offset = end
        raw = json.dumps(header, separators=(",", ":")).encode()
        self.header = raw + b" " * (-len(raw) % 8)  # the data starts 8-byte aligned

    def __enter__(self) -> _SafetensorsStream:
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fh = self.path.open("wb")
            self.fh.write(len(self.header).to_bytes(8, "little") + self.header)
        return self

    def write(self, tensor: torch.Tensor) -> None:
        if self.enabled:
            data = tensor.detach().to("cpu", dtype=_cast(tensor, self.dtype)).contiguous()
            raw: Any = data.view(-1).view(torch.uint8).numpy()
            self.fh.write(raw)  # the tensor's own bytes, not a copy

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.fh.close()
