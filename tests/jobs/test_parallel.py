"""FSDP2 on 2 CPU processes over gloo, without Ray: sharded loading from safetensors, a few
training steps, a DCP checkpoint, the streamed Hugging Face export; then, in this process,
the export and the checkpoint read back the way another job would."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.jobs.ranks import spawn_ranks
from thinkforge.jobs.checkpointing import CheckpointError, CheckpointManager, export_hf

pytestmark = pytest.mark.slow

INPUT = torch.tensor([[5, 17, 42, 99, 3, 7, 11, 250, 13, 1]])


def _adamw(model: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-2)


def _train(model: Any, optimizer: torch.optim.Optimizer, steps: int) -> None:
    from thinkforge.jobs.parallel import clip_grad_norm

    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(0, 300, (2, 12), generator=generator)
        model(input_ids=ids, labels=ids).loss.backward()
        clip_grad_norm(model, 1.0)
        optimizer.step()
        optimizer.zero_grad()


def _fsdp_worker(rank: int, world: int, tiny: str, out: str) -> None:
    """One rank: shard, check it holds only its share, train, checkpoint, export."""
    from torch.distributed.tensor import DTensor

    from thinkforge.jobs.parallel import build_model, is_sharded

    model = build_model(
        tiny, strategy="fsdp", device=torch.device("cpu"), world=world, load_weights=True
    )
    assert is_sharded(model)
    optimizer = _adamw(model)  # before any forward, as the job does
    params = list(model.parameters())
    assert all(isinstance(p, DTensor) for p in params)
    held = sum(p.to_local().numel() for p in params)
    total = sum(p.numel() for p in params)
    torch.save(
        {"held": held, "total": total, "logits_loaded": model(input_ids=INPUT).logits},
        Path(out) / f"rank{rank}-before.pt",
    )
    _train(model, optimizer, steps=3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    manager = CheckpointManager(
        model, optimizer, scheduler, global_batch=4, strategy="fsdp", rank=rank, world=world
    )
    manager.save(Path(out) / "ckpt", step=3)
    # Small shards: the export of this ~1M-parameter model spans several files.
    export_hf(model, Path(out) / "export", dtype=torch.float32, rank=rank, max_shard_bytes=1 << 20)
    logits = model(input_ids=INPUT).logits.detach()
    # The same training over torch's own gloo collectives, which apply_fsdp replaces
    # on CPU by point-to-point exchanges: it must end in the same model.
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import (
        DefaultAllGather,
        DefaultReduceScatter,
    )

    reference = build_model(
        tiny, strategy="fsdp", device=torch.device("cpu"), world=world, load_weights=True
    )
    for unit in reference.modules():
        if isinstance(unit, FSDPModule):
            unit.set_custom_all_gather(DefaultAllGather())
            unit.set_custom_reduce_scatter(DefaultReduceScatter())
    _train(reference, _adamw(reference), steps=3)
    default = reference(input_ids=INPUT).logits.detach()
    # Two decoder layers to a unit (resources.fsdp_layers_per_unit): fewer, larger
    # collectives, the same training.
    paired = build_model(
        tiny,
        strategy="fsdp",
        device=torch.device("cpu"),
        world=world,
        layers_per_unit=2,
        load_weights=True,
    )
    _train(paired, _adamw(paired), steps=3)
    torch.save(
        {
            "logits": logits,
            "logits_default_comms": default,
            "logits_two_layers_per_unit": paired(input_ids=INPUT).logits.detach(),
        },
        Path(out) / f"rank{rank}-after.pt",
    )


@pytest.fixture(scope="module")
def fsdp_run(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:

    out = tmp_path_factory.mktemp("fsdp")
    spawn_ranks(_fsdp_worker, 2, str(tiny_dir), str(out))
    return out


def test_each_rank_loads_only_its_shard_and_matches_the_full_model(
    fsdp_run: Path, tiny_dir: Path
) -> None:
    from transformers import AutoModelForCausalLM

    full = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    expected = full(input_ids=INPUT).logits
    for rank in (0, 1):
        before = torch.load(fsdp_run / f"rank{rank}-before.pt")
        assert before["held"] <= 0.55 * before["total"]
        torch.testing.assert_close(before["logits_loaded"], expected, rtol=1e-5, atol=1e-5)


def test_cpu_collectives_by_exchange_train_as_torchs_own(fsdp_run: Path) -> None:
    for rank in (0, 1):
        after = torch.load(fsdp_run / f"rank{rank}-after.pt")
        torch.testing.assert_close(
            after["logits"], after["logits_default_comms"], rtol=1e-5, atol=1e-5
        )


def test_two_layers_per_fsdp_unit_train_as_one(fsdp_run: Path) -> None:
    for rank in (0, 1):
        after = torch.load(fsdp_run / f"rank{rank}-after.pt")
        torch.testing.assert_close(
            after["logits"], after["logits_two_layers_per_unit"], rtol=1e-5, atol=1e-5
        )


def test_sharded_export_loads_with_from_pretrained_and_gives_the_same_logits(
    fsdp_run: Path,
) -> None:
    from transformers import AutoModelForCausalLM

    export = fsdp_run / "export"
    index = json.loads((export / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(p.name for p in export.glob("*.safetensors")) == shards
    assert "lm_head.weight" not in index["weight_map"]  # tied to the embeddings
    model = AutoModelForCausalLM.from_pretrained(export).eval()
    trained = torch.load(fsdp_run / "rank0-after.pt")["logits"]
    torch.testing.assert_close(model(input_ids=INPUT).logits, trained, rtol=1e-5, atol=1e-5)


def _single_worker(model: Any, global_batch: int = 4) -> tuple[Any, CheckpointManager]:
    """An optimizer and a checkpoint manager for one unsharded worker, as under DDP."""
    optimizer = _adamw(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return optimizer, CheckpointManager(
        model, optimizer, scheduler, global_batch=global_batch, strategy="ddp", rank=0, world=1
    )


def test_a_checkpoint_of_two_fsdp_ranks_loads_into_one_unsharded_worker(
    fsdp_run: Path, tiny_dir: Path
) -> None:
    """DCP reshards: 2 FSDP shards in, one whole replica (as under DDP) out, optimizer too."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    optimizer, manager = _single_worker(model)
    assert manager.load(fsdp_run / "ckpt") == 3
    trained = torch.load(fsdp_run / "rank0-after.pt")["logits"]
    torch.testing.assert_close(model.eval()(input_ids=INPUT).logits, trained, rtol=1e-5, atol=1e-5)
    state = optimizer.state[next(iter(model.parameters()))]
    assert int(state["step"]) == 3 and state["exp_avg"].abs().sum() > 0


def test_a_checkpoint_of_another_shape_is_refused_with_a_code(
    fsdp_run: Path, tiny_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    before = [p.detach().clone() for p in model.parameters()]
    _, other_batch = _single_worker(model, global_batch=8)
    with pytest.raises(CheckpointError, match="global_batch") as info:
        other_batch.load(fsdp_run / "ckpt")
    assert info.value.code == "checkpoint_incompatible"
    (tmp_path / "trainer_state.pt").write_bytes(b"")  # the full-state layout of old
    with pytest.raises(CheckpointError, match="older version"):
        other_batch.load(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    config = AutoConfig.from_pretrained(tiny_dir)
    config.num_hidden_layers = 1
    _, shallower = _single_worker(AutoModelForCausalLM.from_config(config))
    with pytest.raises(CheckpointError, match="architecture"):
        shallower.load(fsdp_run / "ckpt")


def _collectives_worker(rank: int, world: int, out: str) -> None:
    """One of 3 ranks: the CPU collectives against gloo's own on the same inputs."""
    import torch.distributed as dist

    from thinkforge.jobs.parallel import _AllGatherByExchange, _ReduceScatterByExchange

    group = dist.group.WORLD
    shard = torch.randn(5, generator=torch.Generator().manual_seed(rank))
    gathered, expected = torch.empty(5 * world), torch.empty(5 * world)
    _AllGatherByExchange()(gathered, shard, group)
    dist.all_gather_into_tensor(expected, shard)
    results = {"gathered": (gathered, expected)}
    for op in (dist.ReduceOp.SUM, dist.ReduceOp.AVG):
        grads = torch.randn(4 * world, generator=torch.Generator().manual_seed(10 + rank))
        mine, theirs = torch.empty(4), torch.empty(4)
        dist.reduce_scatter_tensor(theirs, grads.clone(), op=dist.ReduceOp.SUM)
        if op == dist.ReduceOp.AVG:
            theirs /= world  # gloo has no AVG
        _ReduceScatterByExchange()(mine, grads, group, op)
        results[str(op)] = (mine, theirs)
    torch.save(results, Path(out) / f"rank{rank}.pt")


def test_cpu_collectives_match_gloos_on_three_ranks(tmp_path: Path) -> None:
    """More than 2 ranks: the all-gather exchanges with every peer, the reduce-scatter
    runs a ring of several steps."""

    spawn_ranks(_collectives_worker, 3, str(tmp_path))
    for rank in range(3):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        assert len(results) == 3
        for got, expected in results.values():
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
