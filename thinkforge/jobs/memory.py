"""How much memory one training worker needs, and the one rule ``strategy: auto`` applies.

Pure arithmetic (no torch), so the job, the bench and the docs all use the same figures:

    shape = ModelShape.from_config(hf_config)            # or ModelShape(n_params=..., ...)
    est = estimate_memory(shape, world_size=16, block_size=32768, micro_batch_size=1,
                          mixed_precision=True, activation_checkpointing=True)
    choose_strategy(shape, world_size=16, capacity_bytes=80e9, ...)   # "ddp" or "fsdp"

Per worker, in bytes. Model states follow ZeRO (Rajbhandari et al., 2020): fp32 master
weights (4 B/param), fp32 gradients (4) and AdamW's two moments (8): 16 B/param, all of
it on every worker under DDP and 1/N of it under FSDP, which also gathers one decoder
layer at a time (twice: prefetch) in the compute dtype. Activations follow Korthikanti et
al. (2022) with memory-efficient attention (no s^2 term): 34 s h bytes per layer in 16-bit
(twice that in fp32); with activation checkpointing only each layer's 16-bit input is kept
(2 s h) plus one layer recomputed. The logits add s V (compute dtype + the fp32 copy the
loss takes). It is an estimate for choosing, not a promise: allocator slack and
communication buffers come on top, hence the headroom.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

__all__ = [
    "HEADROOM",
    "QWEN25_32B",
    "MemoryEstimate",
    "ModelShape",
    "choose_strategy",
    "estimate_memory",
]

# Qwen2.5-32B-Instruct's config.json, the shape only: the s1 and LIMO recipes' model, for
# projections where its weights are not at hand (``Qwen2Config(**QWEN25_32B)``).
QWEN25_32B = {
    "hidden_size": 5120,
    "intermediate_size": 27648,
    "num_hidden_layers": 64,
    "num_attention_heads": 40,
    "num_key_value_heads": 8,
    "vocab_size": 152064,
    "tie_word_embeddings": False,
}

HEADROOM = 0.85  # of a worker's memory the estimate may fill

GB = 1e9


@dataclass(frozen=True)
class ModelShape:
    n_params: int
    n_layers: int
    hidden_size: int
    vocab_size: int
    layer_params: int  # parameters of one decoder layer (the unit FSDP gathers)

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """The shape of a decoder-only Hugging Face config (Qwen2/Llama style), by arithmetic."""
        h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
        heads = config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or h // heads
        q, kvd = heads * head_dim, kv * head_dim
        bias = q + 2 * kvd if getattr(config, "attention_bias", True) else 0
        attention = h * q + 2 * h * kvd + q * h + bias
        layer = attention + 3 * h * i + 2 * h
        embeddings = v * h * (1 if getattr(config, "tie_word_embeddings", False) else 2)
        layers = config.num_hidden_layers
        return cls(layers * layer + embeddings + h, layers, h, v, layer)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per worker by part; ``total`` is what a worker must hold at its peak."""

    strategy: str
    states: float  # weights, gradients, optimizer moments (this worker's share)
    gathered: float  # FSDP: unsharded layers in flight
    activations: float
    logits: float

    @property
    def total(self) -> float:
        return self.states + self.gathered + self.activations + self.logits

    def as_gb(self) -> dict[str, Any]:
        row = {
            k: (round(v / GB, 2) if isinstance(v, float) else v) for k, v in asdict(self).items()
        }
        return row | {"total": round(self.total / GB, 2)}


def estimate_memory(
    shape: ModelShape,
    *,
    strategy: Literal["ddp", "fsdp"],
    world_size: int,
    block_size: int,
    micro_batch_size: int = 1,
    mixed_precision: bool = True,
    activation_checkpointing: bool = False,
    cpu_offload: bool = False,
) -> MemoryEstimate:
    """One worker's peak training memory (on the accelerator, or the host on CPU)."""
    compute_bytes = 2 if mixed_precision else 4
    tokens = block_size * micro_batch_size
    states = 16.0 * shape.n_params
    gathered = 0.0
    if strategy == "fsdp":
        states /= world_size
        gathered = 2.0 * shape.layer_params * compute_bytes * 2  # weights + grads, prefetch
        if cpu_offload:
            states = 0.0  # sharded states live in host memory
    per_layer_full = 17.0 * tokens * shape.hidden_size * compute_bytes
    if activation_checkpointing:
        activations = shape.n_layers * tokens * shape.hidden_size * compute_bytes + per_layer_full
    else:
        activations = shape.n_layers * per_layer_full
    logits = float(tokens * shape.vocab_size * (compute_bytes + 4))
    return MemoryEstimate(strategy, states, gathered, float(activations), logits)


def choose_strategy(
    shape: ModelShape,
    *,
    world_size: int,
    capacity_bytes: float,
    block_size: int,
    micro_batch_size: int = 1,
    mixed_precision: bool = True,
    activation_checkpointing: bool = False,
) -> Literal["ddp", "fsdp"]:
    """DDP while a whole replica fits one worker's memory (with headroom); FSDP otherwise.

    A single worker has nothing to shard across, so it stays on DDP."""
    if world_size <= 1:
        return "ddp"
    ddp = estimate_memory(
        shape,
        strategy="ddp",
        world_size=world_size,
        block_size=block_size,
        micro_batch_size=micro_batch_size,
        mixed_precision=mixed_precision,
        activation_checkpointing=activation_checkpointing,
    )
    return "ddp" if ddp.total <= HEADROOM * capacity_bytes else "fsdp"
