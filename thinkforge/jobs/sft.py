"""The SFT training loop (one copy per Ray Train worker) and the driver that launches it.

``run_training`` builds a ``TorchTrainer`` (Ray Train V2, the default in Ray 2.60) whose
workers run ``train_loop_per_worker``: the tokenizer, then the model built and parallelised
by ``thinkforge.jobs.parallel`` (DDP, or FSDP2 over gloo on CPU and NCCL on GPU; ``auto``
picks), gradients accumulated up to the global batch, AdamW with linear warmup then cosine
(or linear/constant) decay, bf16 on GPUs (autocast under DDP, FSDP's mixed precision
policy), gradient clipping, per-step metrics to MLflow from rank 0, and checkpoints
(``thinkforge.jobs.checkpointing``: sharded DCP state plus a Hugging Face export) reported
by every rank with ``ray.train.report`` (layout: ``thinkforge.jobs.checkpoints``).

Resume is exact: the data order is a pure function of (seed, epoch), so a worker that
restarts from the checkpoint of step ``s`` skips the batches of steps before ``s`` in
that epoch and restores model, optimizer, scheduler and RNG state, each rank its own
shards. This holds both for worker failures (``FailureConfig.max_failures``) and for a resubmitted job: the same
``RunConfig(name=job_id, storage_path=...)`` puts its checkpoints in one place, and every
start goes on from the latest complete one there; a retry logs each step to MLflow once.

    result = run_training(cfg, job_id, storage_path, model_path=path,
                          tracking_uri=uri, run_id=run_id)
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader, Sampler

from thinkforge.contract import (
    DATA_METRIC_PREFIX,
    EXPERTS_PLOT,
    LORA_METRIC_PREFIX,
    TRAINED_TOKENS,
    emit_event,
)
from thinkforge.jobs.checkpointing import CheckpointManager, export_hf
from thinkforge.jobs.checkpoints import (
    STATE_FILE,
    checkpoint_dir_name,
    list_checkpoints,
    pause_requested,
)
from thinkforge.jobs.config import MoE, SFTConfig
from thinkforge.jobs.data import (
    IGNORE_INDEX,
    DataStats,
    TokenizedExample,
    collate,
    ensure_pad_token,
    load_examples,
)
from thinkforge.jobs.lora import export_adapter, trainable_counts
from thinkforge.jobs.moe import (
    RouterSpec,
    RouterStats,
    expert_heatmap,
    is_moe,
    load_metrics,
    router_spec,
    router_stats,
    step_router_loss,
)
from thinkforge.jobs.parallel import build_model, clip_grad_norm, gradient_sync, resolve_strategy

__all__ = [
    "ClusterTooSmall",
    "EpochSampler",
    "StepCallback",
    "TrainPlan",
    "lr_lambda",
    "plan_steps",
    "run_training",
    "train_loop_per_worker",
]


class StepCallback(Protocol):
    """Called on every worker after each optimizer step (and its checkpoint, if one was
    due): progress hooks, and fault injection in tests. It must pickle (Ray ships it)."""

    def __call__(self, *, step: int, rank: int, world_size: int) -> None: ...


@dataclass(frozen=True)
class TrainPlan:
    world_size: int
    micro_batch_size: int
    accumulation: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def plan_steps(
    n_sequences: int,
    *,
    world_size: int,
    micro_batch_size: int,
    global_batch_size: int,
    n_epochs: int,
    max_steps: int | None,
    warmup_ratio: float,
) -> TrainPlan:
    """How many micro-batches make a step, and how many steps the job takes."""
    per_step = micro_batch_size * world_size
    if global_batch_size % per_step:
        raise ValueError(
            f"batch_size {global_batch_size} is not a multiple of micro_batch_size x "
            f"num_workers = {per_step}; change one of them"
        )
    accumulation = global_batch_size // per_step
    steps_per_epoch = n_sequences // global_batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"the dataset has {n_sequences} training sequences, fewer than one global batch "
            f"({global_batch_size}); lower hyperparameters.batch_size"
        )
    total = steps_per_epoch * n_epochs
    if max_steps is not None:
        total = min(total, max_steps)
    warmup = math.ceil(warmup_ratio * total)
    return TrainPlan(world_size, micro_batch_size, accumulation, steps_per_epoch, total, warmup)


def lr_lambda(kind: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR multiplier per step: linear warmup, then cosine/linear decay to 0, or constant."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


class EpochSampler(Sampler[int]):
    """This rank's share of a permutation fixed by (seed, epoch), from a start offset.

    Unlike ``DistributedSampler`` it can start mid-epoch, which is how a resumed worker
    skips exactly the samples it consumed before the checkpoint.
    """

    def __init__(self, n: int, *, rank: int, world_size: int, seed: int) -> None:
        self.n, self.rank, self.world_size, self.seed = n, rank, world_size, seed
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _indices(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=generator).tolist()
        per_rank = self.n // self.world_size
        return order[self.rank :: self.world_size][:per_rank]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.start :])

    def __len__(self) -> int:
        return self.n // self.world_size - self.start


@dataclass
class _Worker:
    """What one worker holds while training."""

    cfg: SFTConfig
    rank: int
    model: Any
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    loader: Any
    sampler: EpochSampler
    plan: TrainPlan
    autocast: Callable[[], contextlib.AbstractContextManager[Any]]
    checkpoints: CheckpointManager
    export_dtype: torch.dtype  # the training dtype: bf16 under mixed precision
    step: int = 0
    validation: list[TokenizedExample] | None = None  # this rank's share, in file order
    validation_size: int = 0  # 0 when the set has fewer sequences than ranks: a filler share
    data_stats: dict[str, int] | None = None  # what tokenization kept, cut and dropped
    trained_tokens: int = 0  # tokens the loss was computed on, all ranks, whole job
    router: RouterSpec | None = None  # an MoE base: thinkforge adds the router loss
    lora_stats: dict[str, float] | None = None  # LoRA: trainable and total parameters


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """The function Ray Train runs on every worker (see ``run_training``)."""
    import ray.train

    from thinkforge.jobs.tracking import MetricLogger

    cfg = SFTConfig.model_validate(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    checkpoint = _resume_checkpoint(loop_config["storage_path"], loop_config["job_id"], world)
    source_cm = checkpoint.as_directory() if checkpoint else contextlib.nullcontext()
    with source_cm as ckpt_dir:
        worker = _build_worker(cfg, loop_config["model_path"], ckpt_dir, rank, world)
        if ckpt_dir:  # the count goes on from the checkpoint's
            state = json.loads((Path(ckpt_dir) / STATE_FILE).read_text())
            worker.trained_tokens = int(state["metrics"].get(TRAINED_TOKENS, 0))
    logger = None
    if rank == 0 and loop_config.get("run_id"):
        logger = MetricLogger(loop_config["tracking_uri"], loop_config["run_id"])
        logger.skip_logged_steps()  # a retry trains the steps after its checkpoint again
    if logger is not None and worker.data_stats is not None:
        # Step 0 holds the dataset's figures; the control plane turns them into an event.
        logger.log({DATA_METRIC_PREFIX + k: v for k, v in worker.data_stats.items()}, step=0)
        if worker.lora_stats is not None:
            logger.log({LORA_METRIC_PREFIX + k: v for k, v in worker.lora_stats.items()}, step=0)
        logger.flush()
    if rank == 0:
        emit_event("training_started", step=worker.step, **asdict(worker.plan))
    pause = _pause_check(loop_config.get("storage_path"), loop_config.get("job_id"), rank, world)
    _train(worker, logger, loop_config.get("callbacks", ()), pause=pause)
    if logger is not None:
        logger.flush()


def _resume_checkpoint(storage_path: str, job_id: str, world: int) -> Any:
    """The job's latest complete checkpoint on storage (None: start), rank 0's pick for all.

    Not ``ray.train.get_checkpoint()``: Ray Train records a checkpoint only when it next
    polls the workers (every 2 s), so a run lost in between (a killed worker, a lost head)
    would go back to an older checkpoint, or to step 1, while the control plane lists the
    newer one and says the retry resumes from it."""
    import pyarrow.fs as pafs
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    filesystem, root = pafs.FileSystem.from_uri(storage_path)
    found = list_checkpoints(root, job_id, filesystem=filesystem)
    picked = [found[-1].path if found else None]
    if world > 1:  # a checkpoint finishing its upload meanwhile must not split the ranks
        dist.broadcast_object_list(picked, src=0, device=ray.train.torch.get_device())
    return ray.train.Checkpoint(picked[0], filesystem=filesystem) if picked[0] else None


def _build_worker(
    cfg: SFTConfig, model_path: str, ckpt_dir: str | None, rank: int, world: int
) -> _Worker:
    import ray.train.torch
    from transformers import AutoTokenizer

    source = ckpt_dir or model_path
    tokenizer = AutoTokenizer.from_pretrained(source)
    ensure_pad_token(tokenizer)
    examples, stats = _tokenize(cfg, tokenizer, cfg.dataset, packing=cfg.packing)
    if rank == 0:
        emit_event("data", **stats.as_dict())
    hp = cfg.hyperparameters
    plan = plan_steps(
        len(examples),
        world_size=world,
        micro_batch_size=hp.micro_batch_size,
        global_batch_size=hp.batch_size,
        n_epochs=hp.n_epochs,
        max_steps=hp.max_steps,
        warmup_ratio=hp.warmup_ratio,
    )
    device = ray.train.torch.get_device()
    dtype = _autocast_dtype(cfg.mixed_precision, device)
    # A LoRA checkpoint exports the adapter alone: the base always comes from model_path.
    model_source = model_path if cfg.lora else source
    strategy, model = _parallel_model(
        cfg, model_source, device, world, dtype, resume=bool(ckpt_dir)
    )
    sharded = strategy == "fsdp"
    router = _router(cfg, _unwrap(model))
    optimizer = _optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(hp.lr_scheduler, plan.warmup_steps, plan.total_steps)
    )
    sampler = EpochSampler(len(examples), rank=rank, world_size=world, seed=cfg.seed)
    loader = _loader(examples, sampler, hp.micro_batch_size, tokenizer.pad_token_id, cfg.packing)
    autocast_dtype = None if sharded else dtype
    worker = _Worker(
        data_stats=stats.as_dict(),
        cfg=cfg,
        rank=rank,
        model=model,
        tokenizer=tokenizer,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler(device.type, enabled=dtype is torch.float16),
        loader=loader,
        sampler=sampler,
        plan=plan,
        autocast=lambda: torch.autocast(
            device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None
        ),
        checkpoints=CheckpointManager(
            model,
            optimizer,
            scheduler,
            global_batch=hp.batch_size,
            strategy=strategy,
            rank=rank,
            world=world,
        ),
        export_dtype=dtype or torch.float32,
        router=router,
    )
    if cfg.validation_dataset:
        examples = _validation_set(cfg, tokenizer, rank)
        worker.validation = examples[rank::world] or examples[:1]
        worker.validation_size = len(examples[rank::world])
    if ckpt_dir:
        worker.step = worker.checkpoints.load(ckpt_dir)
    if cfg.lora is not None:
        trainable, total = trainable_counts(model)
        worker.lora_stats = {
            "trainable_params": float(trainable),
            "total_params": float(total),
            "trainable_fraction": trainable / total,
        }
        if rank == 0:
            emit_event("lora", **worker.lora_stats)
    if rank == 0:
        emit_event("parallel", strategy=strategy, world_size=world)
    return worker


def _parallel_model(
    cfg: SFTConfig,
    source: str,
    device: torch.device,
    world: int,
    dtype: torch.dtype | None,
    *,
    resume: bool,
) -> tuple[str, Any]:
    """The strategy (``auto`` resolved) and the model built for it."""
    from transformers import AutoConfig

    strategy = resolve_strategy(
        cfg.resources.strategy,
        AutoConfig.from_pretrained(source),
        world=world,
        device=device,
        block_size=cfg.block_size,
        micro_batch_size=cfg.hyperparameters.micro_batch_size,
        mixed_precision=dtype is not None,
        activation_checkpointing=cfg.gradient_checkpointing,
    )
    model = build_model(
        source,
        strategy=strategy,
        device=device,
        world=world,
        param_dtype=dtype if strategy == "fsdp" else None,  # FSDP computes in it; DDP autocasts
        activation_checkpointing=cfg.gradient_checkpointing,
        cpu_offload=cfg.resources.cpu_offload,
        layers_per_unit=cfg.resources.fsdp_layers_per_unit,
        load_weights=not resume,  # a checkpoint's DCP state fills them
        lora=cfg.lora,
    )
    return strategy, model


def _tokenize(
    cfg: SFTConfig, tokenizer: Any, path: str, *, packing: bool
) -> tuple[list[TokenizedExample], DataStats]:
    """A dataset as the job's sequences: its format, template, block size, overlong rule."""
    return load_examples(
        path,
        tokenizer,
        fmt=cfg.format,
        template=cfg.template,
        block_size=cfg.block_size,
        overlong=cfg.overlong,
        packing=packing,
    )


def _validation_set(cfg: SFTConfig, tokenizer: Any, rank: int) -> list[TokenizedExample]:
    assert cfg.validation_dataset is not None
    examples, stats = _tokenize(cfg, tokenizer, cfg.validation_dataset, packing=False)
    if not examples:
        raise ValueError(f"{cfg.validation_dataset} holds no sequence within block_size")
    if rank == 0:
        emit_event("validation_data", **stats.as_dict())
    return examples


def _correct_tokens(logits: Any, labels: Any) -> int:
    """How many trained tokens the model predicted (argmax) right: token accuracy's count."""
    targets = labels[:, 1:]
    hits = logits[:, :-1].argmax(-1).eq(targets) & targets.ne(IGNORE_INDEX)
    return int(hits.sum())


def _validation_metrics(worker: _Worker) -> dict[str, float]:
    """Mean loss per predicted token (``val_loss``) and token accuracy
    (``val_token_accuracy``) over the whole validation set, all ranks together.

    Every rank runs the same number of forward passes (FSDP gathers parameters in each):
    a rank whose share ran out repeats a batch that counts for nothing."""
    import torch.distributed as dist

    assert worker.validation is not None
    model, plan, micro = worker.model, worker.plan, worker.cfg.hyperparameters.micro_batch_size
    share = worker.validation
    batches = -(-worker.validation_size // micro)
    device = next(model.parameters()).device  # NCCL reduces device tensors, gloo CPU ones
    rounds = torch.tensor([batches], device=device)
    if plan.world_size > 1:
        dist.all_reduce(rounds, op=dist.ReduceOp.MAX)
    forward = _unwrap(model)  # DDP's forward would sync buffers; FSDP2's model is itself
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss x tokens, tokens, right
    model.eval()
    try:
        with torch.no_grad(), worker.autocast():
            for i in range(int(rounds)):
                rows = share[i * micro : (i + 1) * micro] or share[:micro]
                batch = collate(rows, worker.tokenizer.pad_token_id)
                batch = {k: v.to(device) for k, v in batch.items()}
                predicted = int(batch["labels"][:, 1:].ne(IGNORE_INDEX).sum())
                counted = predicted if i < batches else 0
                out = forward(**batch)
                totals[0] += out.loss.detach().double() * counted
                totals[1] += counted
                if counted:
                    totals[2] += _correct_tokens(out.logits, batch["labels"])
    finally:
        model.train()
    if plan.world_size > 1:
        dist.all_reduce(totals)
    tokens = totals[1].clamp(min=1)
    return {"val_loss": float(totals[0] / tokens), "val_token_accuracy": float(totals[2] / tokens)}


def _loader(
    examples: list[TokenizedExample], sampler: EpochSampler, micro: int, pad_id: int, packed: bool
) -> Any:
    import ray.train.torch

    loader: DataLoader[Any] = DataLoader(
        examples,  # type: ignore[arg-type]  # a list is a valid map-style dataset
        batch_size=micro,
        sampler=sampler,
        collate_fn=lambda batch: collate(batch, pad_id, packed=packed),
        drop_last=True,
    )
    # Our sampler already shards by rank; Ray only moves batches to the device.
    return ray.train.torch.prepare_data_loader(loader, add_dist_sampler=False)


def _autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or setting == "no":
        return None
    return torch.float16 if setting == "fp16" else torch.bfloat16


def _optimizer(model: Any, cfg: SFTConfig) -> torch.optim.Optimizer:
    """AdamW; like HF Trainer, no weight decay on biases and norm weights (1-D params)."""
    hp = cfg.hyperparameters
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": hp.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=hp.learning_rate, betas=(hp.adam_beta1, hp.adam_beta2))


def _router(cfg: SFTConfig, model: Any) -> RouterSpec | None:
    """The router of an MoE base (RouterError if unknown); transformers' own balancing
    loss is switched off, as ``cfg.moe`` decides it."""
    if not is_moe(model.config):
        if cfg.moe is not None:
            raise ValueError(f"moe: the base model {cfg.model!r} is dense (no experts)")
        return None
    spec = router_spec(model.config)
    base = model.get_base_model() if cfg.lora is not None else model  # under peft's wrapper
    base.router_aux_loss_coef = 0.0
    return spec


def _pause_check(
    storage_path: str | None, job_id: str | None, rank: int, world: int, every_s: float = 1.0
) -> Callable[[], bool]:
    """Whether the control plane asked the run to pause (``checkpoints.request_pause``):
    rank 0 looks in the store at most every ``every_s``, and every rank gets its answer,
    so all of them stop after the same step."""
    import torch.distributed as dist

    last = float("-inf")

    def asked() -> bool:
        nonlocal last
        flag = 0
        if rank == 0 and storage_path and job_id and time.monotonic() - last >= every_s:
            last = time.monotonic()
            flag = int(pause_requested(storage_path, job_id))
        if world > 1:
            every: list[Any] = [0] * world
            dist.all_gather_object(every, flag)
            flag = max(every)
        return bool(flag)

    return asked


def _train(
    worker: _Worker,
    logger: Any,
    callbacks: Sequence[StepCallback] = (),
    pause: Callable[[], bool] | None = None,
) -> None:
    """Train to the plan's last step, or until ``pause`` says stop: then the step just
    taken is checkpointed and the loop returns early (the job ends paused)."""
    plan, cfg = worker.plan, worker.cfg
    every = cfg.checkpoint_every_steps
    while worker.step < plan.total_steps:
        epoch, done_in_epoch = divmod(worker.step, plan.steps_per_epoch)
        per_step = plan.accumulation * plan.micro_batch_size
        worker.sampler.set_epoch(epoch, start=done_in_epoch * per_step)
        batches = iter(worker.loader)
        for _ in range(done_in_epoch, plan.steps_per_epoch):
            micro = [next(batches) for _ in range(plan.accumulation)]
            metrics = _train_step(worker, micro)
            last = worker.step >= plan.total_steps
            pausing = not last and pause is not None and pause()
            saving = last or pausing or (every and worker.step % every == 0)
            if saving and worker.validation is not None:
                metrics.update(_validation_metrics(worker))
            if logger is not None:
                logger.log(metrics, step=worker.step)
            if saving:
                if logger is not None:
                    logger.flush()
                    _log_expert_heatmap(logger, metrics, worker.step)
                _save_checkpoint(worker, metrics)
            for callback in callbacks:
                callback(step=worker.step, rank=worker.rank, world_size=plan.world_size)
            if pausing and worker.rank == 0:
                emit_event("paused", step=worker.step, total_steps=plan.total_steps)
            if last or pausing:
                return


def _log_expert_heatmap(logger: Any, metrics: dict[str, float], step: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = expert_heatmap(metrics, step, Path(tmp) / EXPERTS_PLOT)
        if path is not None:
            logger.log_artifact(path)
            logger.log_artifact(path.rename(path.with_name(f"step-{step:06d}.png")), "experts")


def _train_step(worker: _Worker, micro: list[dict[str, Any]]) -> dict[str, float]:
    """One optimizer step over ``accumulation`` micro-batches; returns global metrics."""
    import torch.distributed as dist

    started = time.perf_counter()
    model, plan = worker.model, worker.plan
    loss_sum = torch.zeros((), dtype=torch.float32)
    tokens = trained = correct = 0
    routed: list[RouterStats] = []
    pending = []  # MoE: every forward first, one backward (moe.py: exact global balance)
    for i, batch in enumerate(micro):
        # Under DDP only the last micro-batch all-reduces gradients.
        with gradient_sync(model, i == len(micro) - 1), worker.autocast():
            if worker.router is None:
                out = model(**batch)
            else:
                out = model(**batch, output_router_logits=True)
                routed.append(
                    router_stats(out.router_logits, worker.router, batch.get("attention_mask"))
                )
            loss = out.loss
        correct += _correct_tokens(out.logits.detach(), batch["labels"])
        del out  # the logits (sequence x vocabulary) need not live through backward
        if worker.router is None:
            worker.scaler.scale(loss / plan.accumulation).backward()
        else:
            pending.append(loss / plan.accumulation)
        loss_sum += loss.detach().float().cpu()
        tokens += int(batch["input_ids"].ne(worker.tokenizer.pad_token_id).sum())
        trained += int(batch["labels"][:, 1:].ne(IGNORE_INDEX).sum())  # what the loss saw
    moe_metrics = {}
    if worker.router is not None:
        moe_cfg = worker.cfg.moe or MoE()
        router = step_router_loss(
            routed,
            worker.router,
            balance=moe_cfg.balance,
            aux_loss_coef=moe_cfg.aux_loss_coef,
            router_z_loss_coef=moe_cfg.router_z_loss_coef,
            world_size=plan.world_size,
        )
        worker.scaler.scale(torch.stack(pending).sum() + router.loss).backward()
        terms = torch.stack([router.aux, router.z]).to(router.counts.device)
        if plan.world_size > 1:
            dist.all_reduce(terms)
        terms = terms.cpu() / plan.world_size
        moe_metrics = load_metrics(router.counts.cpu(), float(terms[0]), float(terms[1]))
    worker.scaler.unscale_(worker.optimizer)
    grad_norm = clip_grad_norm(model, worker.cfg.hyperparameters.max_grad_norm)
    lr = float(worker.scheduler.get_last_lr()[0])
    worker.scaler.step(worker.optimizer)
    worker.scaler.update()
    worker.scheduler.step()
    worker.optimizer.zero_grad(set_to_none=True)
    worker.step += 1
    device = micro[0]["input_ids"].device  # NCCL reduces device tensors, gloo CPU ones
    totals = torch.tensor(
        [float(loss_sum) / len(micro), float(tokens), float(trained), float(correct)],
        device=device,
    )
    if plan.world_size > 1:
        dist.all_reduce(totals)
    elapsed = time.perf_counter() - started
    worker.trained_tokens += int(totals[2])
    return {
        "loss": float(totals[0]) / plan.world_size,
        "lr": lr,
        "grad_norm": float(grad_norm),
        "tokens_per_s": float(totals[1]) / elapsed,
        "token_accuracy": float(totals[3]) / max(1.0, float(totals[2])),
        "epoch": worker.step / plan.steps_per_epoch,
        "step": float(worker.step),
        "total_steps": float(plan.total_steps),
        TRAINED_TOKENS: float(worker.trained_tokens),
        **moe_metrics,
    }


def _unwrap(model: Any) -> Any:
    return model.module if hasattr(model, "module") else model


def _save_checkpoint(worker: _Worker, metrics: dict[str, float]) -> None:
    """Every rank writes its DCP shards and takes part in the export, which rank 0 writes
    with the tokenizer and the state file; every rank reports its files (a barrier)."""
    import ray.train
    import torch.distributed as dist

    name = checkpoint_dir_name(worker.step)
    with tempfile.TemporaryDirectory(prefix="thinkforge-ckpt-") as tmp:
        out = Path(tmp)
        layout = worker.checkpoints.save(out, step=worker.step)
        if worker.cfg.lora is not None:
            export_adapter(
                worker.model, out, lora=worker.cfg.lora, base_model=worker.cfg.model,
                dtype=worker.export_dtype, rank=worker.rank,
            )  # fmt: skip
        else:
            export_hf(
                worker.model,
                out,
                dtype=worker.export_dtype,
                rank=worker.rank,
                max_shard_bytes=worker.cfg.export_shard_mb * 1_000_000,
            )
        files = _file_sizes(out)
        if worker.plan.world_size > 1:  # the state file lists every rank's shards
            every: list[Any] = [None] * worker.plan.world_size
            dist.all_gather_object(every, files)
            files = {k: v for rank_files in every for k, v in rank_files.items()}
        if worker.rank == 0:
            worker.tokenizer.save_pretrained(out)
            _write_state_file(out, worker.step, metrics, layout, files | _file_sizes(out))
        ray.train.report(
            metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name
        )
    if worker.rank == 0:
        emit_event("checkpoint", step=worker.step, name=name, loss=metrics["loss"])


def _file_sizes(directory: Path) -> dict[str, int]:
    return {
        p.relative_to(directory).as_posix(): p.stat().st_size
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def _write_state_file(
    directory: Path,
    step: int,
    metrics: dict[str, float],
    layout: dict[str, Any],
    files: dict[str, int],
) -> None:
    # The file list lets readers tell a fully copied checkpoint from one being uploaded.
    state = {"step": step, "epoch": metrics["epoch"], "metrics": metrics, "layout": layout}
    state["files"] = files
    (directory / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")


class ClusterTooSmall(RuntimeError):
    """The Ray cluster lacks the CPUs or GPUs the job's workers ask for."""


def missing_resources(
    per_worker: dict[str, float], workers: int, cluster: dict[str, float]
) -> dict[str, tuple[float, float]]:
    """resource -> (needed, in the cluster) for each one the cluster has too little of."""
    return {
        name: (amount * workers, cluster.get(name, 0.0))
        for name, amount in per_worker.items()
        if cluster.get(name, 0.0) < amount * workers
    }


def wait_for_resources(per_worker: dict[str, float], workers: int, *, timeout_s: float) -> None:
    """Return once the cluster holds the workers' resources; say so while waiting. Ray
    Train would otherwise wait for them without a word."""
    import ray

    deadline = time.monotonic() + timeout_s
    announced = False
    while missing := missing_resources(per_worker, workers, ray.cluster_resources()):
        what = ", ".join(
            f"{need:g} {name} (the cluster has {have:g})" for name, (need, have) in missing.items()
        )
        if time.monotonic() >= deadline:
            raise ClusterTooSmall(
                f"the job's {workers} workers need {what}: lower resources.num_workers, "
                "resources.gpus_per_worker or resources.cpus_per_worker, or add nodes"
            )
        if not announced:
            emit_event("waiting_for_resources", needed=what, timeout_s=timeout_s)
            announced = True
        time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))


def run_training(
    config: SFTConfig,
    job_id: str,
    storage_path: str,
    *,
    model_path: str,
    tracking_uri: str | None = None,
    run_id: str | None = None,
    callbacks: Sequence[StepCallback] = (),
    resource_timeout_s: float = 600.0,
) -> Any:
    """Run the job's TorchTrainer to completion and return its ``ray.train.Result``.

    ``model_path`` is the resolved base model (see ``tiny.resolve_base_model``). Calling
    this again with the same ``job_id`` and ``storage_path`` resumes from the latest
    checkpoint. ``callbacks`` run on every worker after each step (see ``StepCallback``).
    Raises ``ClusterTooSmall`` when the cluster has not had the workers' CPUs and GPUs for
    ``resource_timeout_s`` (an autoscaler may add nodes meanwhile).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.constants import is_v2_enabled

    if not is_v2_enabled():  # report(checkpoint_dir_name=...) and job-level resume are V2's
        raise RuntimeError("thinkforge needs Ray Train V2: unset RAY_TRAIN_V2_ENABLED=0")
    if "://" not in storage_path:
        storage_path = str(Path(storage_path).absolute())  # Ray wants absolute local paths
    res = config.resources
    use_gpu = res.gpus_per_worker > 0
    resources = {"CPU": res.cpus_per_worker, **({"GPU": res.gpus_per_worker} if use_gpu else {})}
    wait_for_resources(resources, res.num_workers, timeout_s=resource_timeout_s)
    loop_config = {
        "config": config.model_dump(mode="json"),
        "model_path": model_path,
        "tracking_uri": tracking_uri,
        "run_id": run_id,
        "callbacks": list(callbacks),
        "storage_path": storage_path,
        "job_id": job_id,
    }
    env = {
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "TRANSFORMERS_VERBOSITY": "error",
        # Ray's print patch would echo every THINKFORGE_EVENT line twice.
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
        # glibc raises its mmap threshold as large blocks are freed, then keeps the
        # per-layer buffers FSDP gathers and frees in its heaps: host RSS grew to DDP's.
        # A fixed threshold hands them back (bench/train_memory.py: 4.1 -> 2.2 GB).
        "MALLOC_MMAP_THRESHOLD_": "65536",
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=res.num_workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        # ray.train re-exports the V2 RunConfig at run time; mypy sees the V1 signature.
        run_config=RunConfig(  # type: ignore[call-arg]
            name=job_id,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.checkpoints_to_keep),
            worker_runtime_env={"env_vars": env},
        ),
    )
    return trainer.fit()
