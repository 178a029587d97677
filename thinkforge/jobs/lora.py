"""LoRA fine-tuning with ``peft``: adapter layers on a frozen base, under DDP or FSDP2.

The base model is built as for full fine-tuning (``thinkforge.jobs.parallel``); before it
is wrapped or sharded, ``apply_lora`` adds the adapter layers and freezes everything else,
so only adapter parameters reach the optimizer. Checkpoints keep the whole DCP state (the
frozen base too: resume needs nothing else), and their Hugging Face export is the adapter
alone (``export_adapter``: ``adapter_config.json`` + ``adapter_model.safetensors``), whose
config names the job's base model (``thinkforge/tiny``, ``models:/name/N``, a path or a
Hugging Face id) so that a server can find it again. ``merge: true`` merges the final
adapter into the base once, at registration (``merge_adapter``).

    model = apply_lora(model, cfg.lora)              # a PeftModel; base frozen
    export_adapter(model, out, lora=cfg.lora, base_model=cfg.model, dtype=dt, rank=rank)
    merge_adapter(base_path, adapter_dir, out_dir)   # a plain Hugging Face model

Torch, transformers and peft are imported inside the functions that need them; the
control plane checks ``target_modules`` with ``thinkforge.jobs.config.unknown_targets``.

Errors:
    LoraTargetError     target_modules names a module the base model does not have
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from thinkforge.jobs.config import LoRA

__all__ = [
    "ADAPTER_CONFIG_FILE",
    "ADAPTER_WEIGHTS_FILE",
    "LoraTargetError",
    "adapter_base",
    "apply_lora",
    "check_base_targets",
    "check_targets",
    "export_adapter",
    "hf_name",
    "init_lora_weights",
    "is_adapter",
    "merge_adapter",
    "trainable_counts",
]

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
_ADAPTER_FILES = frozenset({ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, "README.md"})


class LoraTargetError(ValueError):
    """``target_modules`` names a module the base model lacks; ``code`` is the job's code."""

    code = "invalid_model"


def _missing(targets: Iterable[str], module_names: Iterable[str]) -> list[str]:
    """peft's rule: a target matches a module whose name is it or ends with ``.target``."""
    names = list(module_names)
    return [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]


def check_targets(model: Any, lora: LoRA, model_ref: str) -> None:
    """Raise ``LoraTargetError`` naming each target ``model`` has no module for."""
    missing = _missing(lora.target_modules, (n for n, _ in model.named_modules()))
    if missing:
        raise LoraTargetError(
            f"lora.target_modules: the base model {model_ref!r} has no module named "
            f"{', '.join(repr(m) for m in missing)}; its attention and MLP projections are "
            "named like q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"
        )


def check_base_targets(model_path: str, lora: LoRA, model_ref: str) -> None:
    """``check_targets`` against the base's architecture, built on the meta device (no
    weights read): the job's driver runs it before any worker starts."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    check_targets(model, lora, model_ref)


def apply_lora(model: Any, lora: LoRA) -> Any:
    """Wrap ``model`` in a ``PeftModel`` with one adapter; every base parameter frozen.
    Works on a model on the meta device too (FSDP2 builds there, then fills shards)."""
    from peft import LoraConfig, get_peft_model

    check_targets(model, lora, getattr(model.config, "_name_or_path", "") or "base")
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def init_lora_weights(model: Any) -> None:
    """peft's initialisation of the adapter after ``to_empty``: A as nn.Linear's default
    (Kaiming uniform, a=sqrt(5)), B zero, so the adapted model starts as the base. Each
    rank fills its own shard of A; the bound depends on the full fan-in only."""
    import torch
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" not in name:
                continue
            local = param.to_local() if isinstance(param, DTensor) else param
            if ".lora_B." in name:
                local.zero_()
            else:
                fan_in = param.shape[1] if param.ndim > 1 else param.shape[0]
                bound = 1 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)) on a Linear
                local.uniform_(-bound, bound)


def hf_name(name: str) -> str:
    """A base parameter's name in the base model's files: ``base_model.model.`` and the
    ``.base_layer`` peft inserts removed."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def trainable_counts(model: Any) -> tuple[int, int]:
    """(trainable, all) parameter counts, whole model (a sharded one counts every shard)."""
    trainable = total = 0
    for param in model.parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return trainable, total


def export_adapter(
    model: Any, directory: str | Path, *, lora: LoRA, base_model: str, dtype: Any, rank: int
) -> None:
    """Write the adapter as peft saves it. Every rank must call it (a sharded adapter
    weight is gathered by all); rank 0 writes."""
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    inner = getattr(model, "module", model)
    for module in inner.modules():  # FSDP: back into shards (parallel.reshard; no cycle)
        if isinstance(module, FSDPModule):
            module.reshard()
    full: dict[str, torch.Tensor] = {}
    for name, param in inner.named_parameters():
        if ".lora_" in name:
            value = param.full_tensor() if isinstance(param, DTensor) else param
            full[name] = value.detach().to("cpu", dtype=dtype).contiguous()
    if rank != 0:
        return
    weights = get_peft_model_state_dict(inner, state_dict=full)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
    config = inner.peft_config["default"]
    config.base_model_name_or_path = base_model  # what the server loads the adapter over
    config.inference_mode = True
    config.save_pretrained(str(out))
    settings = {"lora": lora.model_dump(mode="json"), "base_model": base_model}
    (out / "thinkforge_lora.json").write_text(json.dumps(settings, sort_keys=True) + "\n")


def is_adapter(directory: str | Path) -> bool:
    return (Path(directory) / ADAPTER_CONFIG_FILE).is_file()


def adapter_base(directory: str | Path) -> str:
    """The base model an adapter was trained on, as the job's ``model`` named it."""
    config = json.loads((Path(directory) / ADAPTER_CONFIG_FILE).read_text())
    base = config.get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise ValueError(f"{directory}: the adapter config names no base model")
    return base


def merge_adapter(base_path: str, adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """The base (a loadable path or id) with the adapter merged in, saved as a plain
    Hugging Face model with the adapter folder's tokenizer. The adapter's own files stay
    out: the result loads with ``from_pretrained`` alone."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter_dir, out = Path(adapter_dir), Path(out_dir)
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(out))
    from thinkforge.jobs.checkpoints import model_files

    # The tokenizer and the job's notes travel; the adapter itself does not.
    for path in model_files(adapter_dir):
        top = path.parent == adapter_dir and path.name not in _ADAPTER_FILES
        if top and not (out / path.name).exists():
            shutil.copy2(path, out / path.name)
    return out
