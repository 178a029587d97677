"""The router losses of thinkforge.jobs.moe: transformers' value per micro-batch, and the
global-batch loss exact across 2 gloo processes with gradient accumulation, under DDP and
under FSDP2 (each decoder layer, experts included, sharded by ``apply_fsdp``)."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
import torch.distributed as dist

from tests.jobs.ranks import spawn_ranks
from thinkforge.jobs import moe

WORLD, ACCUM, ROWS, SEQ, VOCAB = 2, 2, 2, 8, 64


def _model(arch: str = "qwen3_moe") -> Any:
    """thinkforge/tiny-moe's architecture (Qwen3-MoE) or a Qwen2-MoE of the same size,
    whose every layer also has a gated shared expert."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    from thinkforge.jobs.tiny import build_tiny_moe_model

    if arch == "qwen3_moe":
        model = build_tiny_moe_model(VOCAB, eos_token_id=1, pad_token_id=0, seed=3, hidden_size=32)
    else:
        torch.manual_seed(3)
        model = Qwen2MoeForCausalLM(
            Qwen2MoeConfig(
                vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=64,
                shared_expert_intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, pad_token_id=0,
            )
        )  # fmt: skip
    # Random routers: the default init is near-uniform, where every loss looks alike.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate.weight"):
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    return model.float()


def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """WORLD * ACCUM micro-batches of ROWS rows, padding at the end of some rows."""
    gen = torch.Generator().manual_seed(7)
    n = WORLD * ACCUM * ROWS
    ids = torch.randint(2, VOCAB, (n, SEQ), generator=gen)
    # Two "domains": half the rows use low token ids only, so routing differs by row.
    ids[::2] = ids[::2] % 12 + 2
    mask = torch.ones(n, SEQ, dtype=torch.long)
    for row, pad in ((1, 3), (4, 5), (6, 1)):
        mask[row, SEQ - pad :] = 0
    return ids, mask


def _router_grads(model: Any) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {
        n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).detach().clone()
        for n, p in model.named_parameters()
        if n.endswith("gate.weight") and p.grad is not None
    }


def _stats(model: Any, spec: moe.RouterSpec, ids: torch.Tensor, mask: torch.Tensor):
    return _forward(model, spec, ids, mask)[0]


def _forward(
    model: Any, spec: moe.RouterSpec, ids: torch.Tensor, mask: torch.Tensor
) -> tuple[moe.RouterStats, torch.Tensor]:
    """A micro-batch's routing and its language-modelling loss (padding not trained)."""
    labels = ids.masked_fill(mask == 0, -100)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True)
    return moe.router_stats(out.router_logits, spec, mask), out.loss


def _step_loss(
    forwards: list[tuple[moe.RouterStats, torch.Tensor]], spec: moe.RouterSpec, world: int, lm: bool
) -> tuple[torch.Tensor, moe.RouterStep]:
    """The step's loss as thinkforge.jobs.sft builds it for an MoE base: the micro-batches'
    mean LM loss (with ``lm``) plus the router loss; one backward follows."""
    step = moe.step_router_loss(
        [s for s, _ in forwards], spec, balance="global", aux_loss_coef=1.0, world_size=world
    )
    if not lm:
        return step.loss, step
    return torch.stack([loss for _, loss in forwards]).sum() / len(forwards) + step.loss, step


def _worker(rank: int, world: int, out: str, strategy: str, lm: bool) -> None:
    """One rank of a training step as thinkforge.jobs.sft runs it for an MoE base."""
    from thinkforge.jobs.parallel import apply_fsdp, gradient_sync

    torch.set_num_threads(1)
    inner = _model()
    if strategy == "ddp":
        # The router loss alone leaves the LM head without a gradient (as an expert no
        # token chose always is): DDP must be told, or it waits and never all-reduces.
        model = torch.nn.parallel.DistributedDataParallel(inner, find_unused_parameters=True)
    else:
        apply_fsdp(inner, device=torch.device("cpu"), world=world)
        model = inner
    spec = moe.router_spec(inner.config)
    ids, mask = _global_batch()
    per_rank = ACCUM * ROWS
    forwards = []
    for i in range(ACCUM):  # every forward first; under DDP the last one arms the hooks
        lo = rank * per_rank + i * ROWS
        with gradient_sync(model, i == ACCUM - 1):
            forwards.append(_forward(model, spec, ids[lo : lo + ROWS], mask[lo : lo + ROWS]))
    loss, step = _step_loss(forwards, spec, world, lm)
    loss.backward()
    aux = step.aux.clone()
    dist.all_reduce(aux)
    torch.save((float(aux) / world, _router_grads(inner), step.counts), f"{out}.{rank}")


@functools.cache
def _reference(lm: bool) -> tuple[float, dict[str, torch.Tensor], torch.Tensor]:
    """One process. The router loss alone: the whole global batch in one forward. With the
    LM loss, a mean per micro-batch, the same micro-batches one after another."""
    model = _model()
    spec = moe.router_spec(model.config)
    ids, mask = _global_batch()
    rows = [slice(i * ROWS, (i + 1) * ROWS) for i in range(WORLD * ACCUM)] if lm else [slice(None)]
    loss, step = _step_loss([_forward(model, spec, ids[r], mask[r]) for r in rows], spec, 1, lm)
    loss.backward()
    return float(step.aux), _router_grads(model), step.counts


# FSDP2 gathers a layer's weights for backward from a hook on the layer's outputs; the
# router loss reaches the gates through the router logits instead, so a loss of the
# router's alone would find the last layer's gate still sharded. A job's loss always has
# the LM term: FSDP is checked on the full step, DDP on the router loss alone.
@pytest.mark.parametrize(("strategy", "lm"), [("ddp", False), ("fsdp", True)])
def test_global_balance_is_exact_across_ranks_and_micro_batches(
    tmp_path, strategy: str, lm: bool
) -> None:
    ref_aux, ref_grads, ref_counts = _reference(lm)
    out = str(tmp_path / "rank")
    spawn_ranks(_worker, WORLD, out, strategy, lm)
    assert len(ref_grads) == 2  # one router per layer
    for rank in range(WORLD):
        aux, grads, counts = torch.load(f"{out}.{rank}")
        assert aux == pytest.approx(ref_aux, abs=1e-5)
        assert torch.equal(counts, ref_counts)
        assert grads.keys() == ref_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], atol=1e-5, rtol=0)


def test_local_counts_would_not_be_the_global_loss() -> None:
    """The check above can fail: f from one micro-batch gives another value."""
    ref_aux, _, _ = _reference(False)
    model = _model()
    spec = moe.router_spec(model.config)
    ids, mask = _global_batch()
    stats = _stats(model, spec, ids[:ROWS], mask[:ROWS])
    local = moe.step_router_loss([stats], spec, balance="global", aux_loss_coef=1.0)
    assert abs(float(local.aux) - ref_aux) > 1e-3


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe"])
@pytest.mark.parametrize("masked", [False, True])
def test_micro_batch_is_transformers_value(arch: str, masked: bool) -> None:
    import importlib

    modeling = importlib.import_module(f"transformers.models.{arch}.modeling_{arch}")
    load_balancing_loss_func = modeling.load_balancing_loss_func
    model = _model(arch)
    assert model.config.model_type == arch
    spec = moe.router_spec(model.config)
    ids, mask = _global_batch()
    for i in range(WORLD * ACCUM):
        rows = slice(i * ROWS, (i + 1) * ROWS)
        m = mask[rows] if masked else None
        out = model(input_ids=ids[rows], attention_mask=m, output_router_logits=True)
        ours = moe.micro_batch_balance_loss(moe.router_stats(out.router_logits, spec, m), spec)
        theirs = load_balancing_loss_func(out.router_logits, spec.num_experts, spec.top_k, m)
        assert float(ours) == pytest.approx(float(theirs), abs=1e-6)
        step = moe.step_router_loss(
            [moe.router_stats(out.router_logits, spec, m)],
            spec,
            balance="micro_batch",
            aux_loss_coef=0.5,
        )
        assert float(step.loss) == pytest.approx(0.5 * float(theirs), abs=1e-6)


def test_router_spec_knows_qwen_moe_and_refuses_other_routers() -> None:
    from transformers import MixtralConfig, Qwen2Config, Qwen2MoeConfig

    assert moe.router_spec(Qwen2MoeConfig(num_experts=8, num_experts_per_tok=2)) == (
        moe.RouterSpec(num_experts=8, top_k=2)
    )
    assert moe.is_moe(Qwen2MoeConfig()) and not moe.is_moe(Qwen2Config())
    mixtral = MixtralConfig(num_local_experts=8)
    assert moe.is_moe(mixtral)
    with pytest.raises(moe.RouterError, match="mixtral"):
        moe.router_spec(mixtral)


def test_z_loss_and_expert_load() -> None:
    logits = torch.tensor([[0.0, 0.0], [3.0, 0.0], [9.0, 9.0]])
    spec = moe.RouterSpec(num_experts=2, top_k=1)
    stats = moe.router_stats([logits], spec, torch.tensor([1, 1, 0]))
    expected = (torch.log(torch.tensor(2.0)) ** 2 + torch.logsumexp(logits[1], 0) ** 2) / 2
    assert float(moe.router_z_loss(stats)) == pytest.approx(float(expected))
    assert moe.expert_load(stats.counts).tolist() == [[1.0, 0.0]]


def test_tiny_moe_is_built_like_tiny(data_dir, tiny_dir) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from thinkforge.jobs.tiny import resolve_base_model

    path = resolve_base_model("thinkforge/tiny-moe", data_dir)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    assert moe.router_spec(model.config) == moe.RouterSpec(num_experts=4, top_k=2)
    assert model.config.router_aux_loss_coef == 0  # thinkforge computes the router loss
    assert AutoTokenizer.from_pretrained(path).get_vocab() == (
        AutoTokenizer.from_pretrained(tiny_dir).get_vocab()
    )


def test_load_metrics_and_heatmap(tmp_path) -> None:
    counts = torch.tensor([[6.0, 2.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    metrics = moe.load_metrics(counts, aux=1.5, z=0.1)
    assert metrics["moe_load_l0_e0"] == 0.75 and metrics["moe_load_l1_e3"] == 0.25
    assert metrics["moe_imbalance_l0"] == 3.0 and metrics["moe_imbalance_l1"] == 1.0
    assert metrics["moe_imbalance"] == 3.0 and metrics["moe_aux_loss"] == 1.5
    png = moe.expert_heatmap(metrics, step=7, path=tmp_path / "experts.png")
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert moe.expert_heatmap({"loss": 1.0}, step=7, path=tmp_path / "dense.png") is None
