"""The MoE router losses, computed by thinkforge rather than by transformers.

Pure torch (no Ray); the training step calls it with the router logits that Qwen2-MoE /
Qwen3-MoE return under ``output_router_logits=True``:

    spec = router_spec(model.config)                       # RouterError if unknown
    stats = [router_stats(out.router_logits, spec, mask) for out, mask in ...]
    step = step_router_loss(stats, spec, balance="global", aux_loss_coef=1e-3,
                            world_size=world_size)         # one all-reduce per step
    (sum(micro_batch_losses) + step.loss).backward()       # one backward per step

The balancing loss is LBL = N_E * sum_i f_i * P_i: f_i is the share of routed tokens that
chose expert i (top-k selections / tokens, so sum_i f_i = k, as in transformers) and P_i
is expert i's mean router probability.

- ``micro_batch`` (``micro_batch_balance_loss``): transformers' ``load_balancing_loss_func``
  on one micro-batch, layers concatenated, kept for comparison.
- ``global`` (Qwen, arXiv 2501.11873; Megatron's ``global_aux_loss``): per layer, f_i from
  the selection counts of every micro-batch of the optimizer step on every data-parallel
  rank; P_i from this rank's own tokens; the loss is the mean over layers.

Exactness under gradient accumulation: f_i is a count, so it is a constant to autograd
(the paper treats it so too), but the counts of later micro-batches are unknown while an
earlier one would run its backward. The train step therefore runs every micro-batch's
forward first, all-reduces the step's counts once, and then runs one backward over the
sum of the micro-batch losses (the autograd engine fires each parameter's DDP/FSDP hook
once). The result is the loss over the whole global batch, to rounding, at no extra
compute; the price is that the step's activations are alive together, as with one large
micro-batch (use gradient checkpointing when that does not fit).
Each rank's share is P computed with its token sums over the *global* token count, so the
shares sum over ranks to the global loss; DDP averages gradients, so the step multiplies
the share by the world size before backward.

Errors::

    ValueError
    └── RouterError        the model is MoE but its router is not one this module knows
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from thinkforge.contract import (
    MOE_AUX_LOSS,
    MOE_IMBALANCE,
    MOE_Z_LOSS,
    expert_load_metric,
    layer_imbalance_metric,
)
from thinkforge.jobs.config import MOE_MODEL_TYPES, moe_kind

__all__ = [
    "KNOWN_MOE_TYPES",
    "RouterError",
    "RouterSpec",
    "RouterStats",
    "RouterStep",
    "expert_heatmap",
    "expert_load",
    "global_balance_loss",
    "global_counts",
    "is_moe",
    "load_metrics",
    "micro_batch_balance_loss",
    "router_spec",
    "router_stats",
    "router_z_loss",
    "step_router_loss",
]

KNOWN_MOE_TYPES = MOE_MODEL_TYPES


class RouterError(ValueError):
    """An MoE base whose router configuration thinkforge does not know."""

    code = "invalid_model"  # the failed job's error.code (the entrypoint tags its line)


@dataclass(frozen=True)
class RouterSpec:
    num_experts: int
    top_k: int


def is_moe(config: Any) -> bool:
    """Whether a transformers config describes a mixture-of-experts model."""
    return moe_kind(config.to_dict()) != "dense"


def router_spec(config: Any) -> RouterSpec:
    """The expert count and top-k of a known MoE config; RouterError otherwise."""
    model_type = getattr(config, "model_type", None)
    if model_type not in KNOWN_MOE_TYPES:
        raise RouterError(
            f"model type {model_type!r} is a mixture of experts whose router thinkforge does "
            f"not know; supported: {', '.join(sorted(KNOWN_MOE_TYPES))}"
        )
    experts_attr, top_k_attr = KNOWN_MOE_TYPES[model_type]
    num_experts, top_k = getattr(config, experts_attr, 0), getattr(config, top_k_attr, 0)
    if not 0 < top_k <= num_experts:
        raise RouterError(f"{model_type}: need 0 < {top_k_attr} <= {experts_attr}")
    return RouterSpec(num_experts=num_experts, top_k=top_k)


@dataclass
class RouterStats:
    """One micro-batch's routing, per layer: what both losses and the metrics need."""

    counts: torch.Tensor  # [L, E] top-k selections of routed tokens; no grad
    prob_sums: torch.Tensor  # [L, E] summed router probabilities; carries the grad
    tokens: torch.Tensor  # [] routed (non-padding) tokens
    logits: tuple[torch.Tensor, ...]  # per layer [T, E], for the z-loss
    mask: torch.Tensor  # [T] 1 for a routed token, 0 for padding


def _flat_mask(attention_mask: torch.Tensor | None, rows: int, device: torch.device):
    if attention_mask is None:
        return torch.ones(rows, dtype=torch.float32, device=device)
    return attention_mask.reshape(-1).to(device=device, dtype=torch.float32)


def router_stats(
    router_logits: Sequence[torch.Tensor],
    spec: RouterSpec,
    attention_mask: torch.Tensor | None = None,
) -> RouterStats:
    """Counts and probability sums of each MoE layer's router over the unmasked tokens."""
    logits = tuple(router_logits)
    mask = _flat_mask(attention_mask, logits[0].shape[0], logits[0].device)
    counts, prob_sums = [], []
    for layer in logits:
        probs = F.softmax(layer.float(), dim=-1)
        selected = torch.topk(probs.detach(), spec.top_k, dim=-1).indices
        hits = torch.zeros(spec.num_experts, device=layer.device).scatter_add_(
            0, selected.reshape(-1), mask.repeat_interleave(spec.top_k)
        )
        counts.append(hits)
        prob_sums.append((probs * mask.unsqueeze(-1)).sum(dim=0))
    return RouterStats(torch.stack(counts), torch.stack(prob_sums), mask.sum(), logits, mask)


def micro_batch_balance_loss(stats: RouterStats, spec: RouterSpec) -> torch.Tensor:
    """transformers' ``load_balancing_loss_func`` value: all layers as one concatenation."""
    rows = stats.tokens * stats.counts.shape[0]
    f = stats.counts.sum(dim=0) / rows
    p = stats.prob_sums.sum(dim=0) / rows
    return spec.num_experts * torch.sum(f * p)


def global_counts(
    stats: Sequence[RouterStats], group: Any = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's per-layer selection counts and routed tokens, summed over micro-batches
    and all-reduced over the data-parallel group (one [L*E + 1] vector, one collective)."""
    counts = torch.stack([s.counts for s in stats]).sum(dim=0)
    tokens = torch.stack([s.tokens for s in stats]).sum()
    flat = torch.cat([counts.reshape(-1), tokens.reshape(1)]).detach()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(flat, group=group)
    num_layers = stats[0].counts.shape[0]
    return flat[:-1].reshape(num_layers, -1), flat[-1]


def global_balance_loss(
    stats: RouterStats, counts: torch.Tensor, tokens: torch.Tensor
) -> torch.Tensor:
    """This micro-batch's share of the global-batch loss (shares sum to it over the step's
    micro-batches and ranks): N_E * mean over layers of sum_i f_i * P_i."""
    num_experts = counts.shape[1]
    f = counts / tokens
    p_share = stats.prob_sums / tokens
    return num_experts * (f * p_share).sum(dim=1).mean()


def router_z_loss(stats: RouterStats) -> torch.Tensor:
    """ST-MoE's z-loss: mean squared log-sum-exp of the router logits over the routed
    tokens, averaged over layers."""
    squares = torch.stack([torch.logsumexp(z.float(), dim=-1).square() for z in stats.logits])
    return (squares * stats.mask).sum() / (stats.tokens.clamp(min=1) * squares.shape[0])


def expert_load(counts: torch.Tensor) -> torch.Tensor:
    """Share of each layer's selections that went to each expert: [L, E], rows sum to 1."""
    return counts / counts.sum(dim=1, keepdim=True).clamp(min=1)


@dataclass
class RouterStep:
    """The router terms of one optimizer step on one rank."""

    loss: torch.Tensor  # add to the step's summed loss before its one backward
    aux: torch.Tensor  # balancing loss; the mean over ranks is the step's value
    z: torch.Tensor  # z-loss, this rank's mean over micro-batches
    counts: torch.Tensor  # [L, E] the step's selections, all ranks


def step_router_loss(
    stats: Sequence[RouterStats],
    spec: RouterSpec,
    *,
    balance: str,
    aux_loss_coef: float,
    router_z_loss_coef: float = 0.0,
    world_size: int = 1,
    group: Any = None,
) -> RouterStep:
    """The router loss of a step whose micro-batches all ran forward (see module doc).

    Scaled like a loss averaged over micro-batches and averaged by DDP over ranks, so the
    step's gradient is that of ``aux_loss_coef * LBL + router_z_loss_coef * z`` on the
    whole global batch.
    """
    counts, tokens = global_counts(stats, group)
    if balance == "global":
        # Shares sum to the global loss; DDP divides gradients by world_size.
        aux = sum((global_balance_loss(s, counts, tokens) for s in stats), torch.zeros(()))
        aux = aux * world_size
    elif balance == "micro_batch":
        per_batch = [micro_batch_balance_loss(s, spec) for s in stats]
        aux = sum(per_batch, torch.zeros(())) / len(stats)
    else:
        aux = torch.zeros(())
    z = sum((router_z_loss(s) for s in stats), torch.zeros(())) / len(stats)
    loss = aux_loss_coef * aux + router_z_loss_coef * z
    return RouterStep(loss=loss, aux=aux.detach(), z=z.detach(), counts=counts)


def load_metrics(counts: torch.Tensor, aux: float, z: float) -> dict[str, float]:
    """The step's MoE metrics under the contract's names."""
    load = expert_load(counts)
    imbalance = load.max(dim=1).values / load.mean(dim=1)
    metrics = {MOE_AUX_LOSS: aux, MOE_Z_LOSS: z, MOE_IMBALANCE: float(imbalance.max())}
    for layer, row in enumerate(load.tolist()):
        metrics[layer_imbalance_metric(layer)] = float(imbalance[layer])
        for expert, share in enumerate(row):
            metrics[expert_load_metric(layer, expert)] = share
    return metrics


def expert_heatmap(metrics: dict[str, float], step: int, path: str | Path) -> Path | None:
    """Expert load by layer and expert (from ``load_metrics``' names) as a PNG; None when
    the metrics hold no expert load (a dense model)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows: list[list[float]] = []
    while expert_load_metric(len(rows), 0) in metrics:
        layer, row = len(rows), list[float]()
        while expert_load_metric(layer, len(row)) in metrics:
            row.append(metrics[expert_load_metric(layer, len(row))])
        rows.append(row)
    if not rows:
        return None
    fig = Figure(figsize=(1.2 + 0.5 * len(rows[0]), 1.2 + 0.4 * len(rows)), dpi=100)
    FigureCanvasAgg(fig)  # no pyplot: no global backend, safe in Ray workers
    ax = fig.add_subplot()
    image = ax.imshow(rows, cmap="viridis", vmin=0, aspect="auto")
    fig.colorbar(image, ax=ax, label="share of selections")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_xticks(range(len(rows[0])))
    ax.set_yticks(range(len(rows)))
    ax.set_title(f"Expert load, step {step}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
