"""LoRA adapters on the transformers engine: one base loaded once, several adapters beside
it, each request decoded through the adapter it names, mixed in one batch, budget forcing
unchanged; and ``lora_setup``'s choice of base and its refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from thinkforge.jobs.config import LoRA, TemplateFamily
from thinkforge.jobs.lora import apply_lora, export_adapter
from thinkforge.serve.config import ModelServeConfig, ThinkingParams
from thinkforge.serve.engine import GenerationRequest, GenerationResult, SamplingParams
from thinkforge.serve.engines.transformers import TransformersEngine
from thinkforge.serve.loader import LoaderError, ModelRef, lora_setup

GREEDY = SamplingParams(temperature=0, max_completion_tokens=24)


def make_adapter(base: Path, out: Path, seed: int, base_name: str) -> Path:
    """An adapter over ``base`` whose A and B matrices are drawn from ``seed`` (a fresh
    adapter is a no-op, and peft draws A from the global RNG, which other tests move)."""
    from transformers import AutoModelForCausalLM

    model = apply_lora(AutoModelForCausalLM.from_pretrained(base), LoRA(r=4))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if ".lora_A." in name or ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    export_adapter(model, out, lora=LoRA(r=4), base_model=base_name, dtype=torch.float32, rank=0)
    return out


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        name: str(make_adapter(tiny_model_dir, root / name, seed, str(tiny_model_dir)))
        for name, seed in (("a", 1), ("b", 2))
    }


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path, adapters: dict[str, str]) -> TransformersEngine:
    engine = TransformersEngine(
        str(tiny_model_dir), template=TemplateFamily.S1, max_batch_size=4, adapters=adapters
    )
    engine.load()
    return engine


def prompt(engine: TransformersEngine) -> list[int]:
    encoded = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Sum: 3 4"}], add_generation_prompt=True,
        enable_thinking=True, thinking_family="s1",
    )  # fmt: skip
    return list(encoded["input_ids"])


def decode(engine: TransformersEngine, *adapters: str | None, **kw: object) -> list[list[int]]:
    requests = [
        GenerationRequest(f"r{i}", prompt(engine), GREEDY, adapter=a, **kw)  # type: ignore[arg-type]
        for i, a in enumerate(adapters)
    ]
    results = {
        e.request_id: e for e in engine.generate(requests) if isinstance(e, GenerationResult)
    }
    return [results[f"r{i}"].token_ids for i in range(len(adapters))]


def test_each_adapter_answers_its_own_way_and_a_mixed_batch_equals_each_alone(
    engine: TransformersEngine, tiny_model_dir: Path
) -> None:
    base_alone, a_alone, b_alone = (decode(engine, x)[0] for x in (None, "a", "b"))
    assert len({tuple(base_alone), tuple(a_alone), tuple(b_alone)}) == 3
    plain = TransformersEngine(str(tiny_model_dir), template=TemplateFamily.S1)
    plain.load()
    assert decode(plain, None)[0] == base_alone  # the base, untouched by its adapters
    assert decode(engine, "a", None, "b", "a") == [a_alone, base_alone, b_alone, a_alone]


def test_an_adapter_deployment_answers_with_its_own_adapter_by_default(
    tiny_model_dir: Path, adapters: dict[str, str], engine: TransformersEngine
) -> None:
    """An adapter version deployed: its adapter is named "" and is the default."""
    own = TransformersEngine(
        str(tiny_model_dir), template=TemplateFamily.S1,
        adapters={"": adapters["a"], "b": adapters["b"]}, default_adapter="",
    )  # fmt: skip
    own.load()
    assert decode(own, None, "b") == [decode(engine, "a")[0], decode(engine, "b")[0]]


def test_budget_forcing_is_unchanged_under_an_adapter(engine: TransformersEngine) -> None:
    """Adapter b's model ends its thinking after one token: a minimum forces waits, and
    the cap then forces the end."""
    thinking = ThinkingParams(min_tokens=8, max_tokens=8, final_answer_prefix="Final Answer:")
    request = GenerationRequest("r", prompt(engine), GREEDY, thinking, adapter="b")
    result = next(e for e in engine.generate([request]) if isinstance(e, GenerationResult))
    assert result.thinking.waits_inserted >= 1
    assert result.thinking.tokens == 8 and result.thinking.forced_end
    assert result.usage.reasoning_tokens == 8


def test_an_unknown_adapter_is_refused_at_submit(engine: TransformersEngine) -> None:
    loop = engine.open_loop()
    with pytest.raises(ValueError, match="no adapter 'c'"):
        loop.submit(GenerationRequest("r", prompt(engine), GREEDY, adapter="c"))
    assert loop.idle


def test_lora_setup_finds_the_base_and_refuses_mixed_bases(
    tiny_model_dir: Path, adapters: dict[str, str], tmp_path: Path
) -> None:
    # An adapter version: its base is what the adapter names; it is the default adapter.
    base, served, default = lora_setup(
        adapters["a"], {"b": adapters["b"]}, ref=None, cache_dir=tmp_path, tracking_uri=None
    )
    assert (base, served, default) == (
        str(tiny_model_dir),
        {"": adapters["a"], "b": adapters["b"]},
        "",
    )
    # A full model: the base itself; an adapter of another base is refused.
    ref = ModelRef("tiny", 1, None, "file:///x", None)
    other = make_adapter(tiny_model_dir, tmp_path / "other", 3, "models:/other/2")
    with pytest.raises(LoaderError, match="trained on 'models:/other/2'"):
        lora_setup(
            tiny_model_dir, {"o": str(other)}, ref=ref, cache_dir=tmp_path, tracking_uri=None
        )
    ours = make_adapter(tiny_model_dir, tmp_path / "ours", 3, "models:/tiny/1")
    assert lora_setup(
        tiny_model_dir, {"o": str(ours)}, ref=ref, cache_dir=tmp_path, tracking_uri=None
    ) == (str(tiny_model_dir), {"o": str(ours)}, None)
    with pytest.raises(LoaderError, match="not a LoRA adapter"):
        lora_setup(
            adapters["a"],
            {"x": str(tiny_model_dir)},
            ref=None,
            cache_dir=tmp_path,
            tracking_uri=None,
        )


def test_vllm_refuses_adapters_with_a_clear_message() -> None:
    with pytest.raises(ValueError, match="transformers engine only"):
        ModelServeConfig(
            name="m", model_path="/m", engine="vllm", device="cpu", adapters={"a": "x/1"}
        )
