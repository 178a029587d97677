"""LoRA pieces without Ray: the driver's target check, the adapter export and the merge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from thinkforge.jobs.__main__ import JobError, resolve_model
from thinkforge.jobs.config import LoRA, SFTConfig
from thinkforge.jobs.lora import (
    adapter_base,
    apply_lora,
    export_adapter,
    hf_name,
    is_adapter,
    merge_adapter,
    trainable_counts,
)


def test_the_driver_refuses_a_target_the_base_lacks_with_its_code(data_dir: Path) -> None:
    """Where the control plane cannot tell (a registry or hub base), the job's driver
    checks the model itself before any worker starts; the code reaches the job's error."""
    config = SFTConfig(lora=LoRA(target_modules=["q_proj", "qkv"]))
    with pytest.raises(JobError, match=r"^\[invalid_model\] .*'qkv'") as caught:
        resolve_model(config, str(data_dir), None)
    assert "'q_proj'" not in str(caught.value)
    ok = SFTConfig(lora=LoRA(target_modules=["layers.0.mlp.down_proj", "v_proj"]))
    assert Path(resolve_model(ok, str(data_dir), None)).is_dir()


def test_only_the_adapter_trains_and_the_merge_is_the_adapted_model(
    tiny_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lora = LoRA(r=4, alpha=8, target_modules=["q_proj", "up_proj"])
    model = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_dir), lora)
    trainable, total = trainable_counts(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".lora_" in n for n in names)
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad) < total
    base_names = {hf_name(n) for n, _ in model.named_parameters() if ".lora_" not in n}
    assert "model.layers.0.self_attn.q_proj.weight" in base_names
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:  # a fresh adapter is a no-op; make it do something
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    adapter = tmp_path / "adapter"
    export_adapter(model, adapter, lora=lora, base_model="thinkforge/tiny",
                   dtype=torch.float32, rank=0)  # fmt: skip
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(adapter)
    assert is_adapter(adapter) and adapter_base(adapter) == "thinkforge/tiny"
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4

    merged_dir = merge_adapter(str(tiny_dir), adapter, tmp_path / "merged")
    assert not is_adapter(merged_dir) and (merged_dir / "tokenizer.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    ids = torch.tensor([[3, 17, 42, 5, 9]])
    model.eval()
    with torch.no_grad():
        expected, got = model(input_ids=ids).logits, merged(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_dir)(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-4)
    assert not torch.allclose(got, plain, atol=1e-3)
