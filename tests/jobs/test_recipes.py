"""Every recipe in recipes/ loads, validates and plans; the R1-distill recipe trains with an
R1-distill-style tokenizer (pad == end of sentence, no <|endoftext|>) built here; the LIMO
recipe with a Qwen2.5-style one, where </think> is plain text; the memory rule behind
``strategy: auto`` picks what the recipes ask for."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from thinkforge.jobs.config import SFTConfig
from thinkforge.jobs.memory import QWEN25_32B, ModelShape, choose_strategy, estimate_memory
from thinkforge.jobs.sft import plan_steps

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))
# Dataset sizes the recipes are written for: s1K and s1K-1.1 1000 rows, LIMO 817.
ROWS = {"limo": 817}


def test_the_recipes_are_all_here() -> None:
    assert {p.stem for p in RECIPES} >= {
        "limo-qwen2.5-32b",
        "r1-distill-qwen-7b",
        "s1.1-qwen2.5-32b",
        "s1k-qwen2.5-32b",
        "tiny-cpu",
        "tiny-moe-cpu",
        "s1.1-qwen3-30b-a3b",
    }
    moe_bases = {"tiny-moe-cpu", "s1.1-qwen3-30b-a3b"}  # Qwen's global-batch balance loss
    for path in RECIPES:
        moe = SFTConfig.from_yaml(path).moe
        assert (moe is not None and moe.balance == "global") == (path.stem in moe_bases)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_validates_and_plans(path: Path) -> None:
    cfg = SFTConfig.from_yaml(path)
    assert cfg.recipe == path.stem
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert any(f"--recipe recipes/{path.name}" in line for line in header), "say how to run it"
    hp, res = cfg.hyperparameters, cfg.resources
    real = any(size in path.stem for size in ("32b", "7b", "30b"))
    rows = ROWS.get(cfg.format.value, 1000 if real else 2000)
    plan = plan_steps(
        rows,
        world_size=res.num_workers,
        micro_batch_size=hp.micro_batch_size,
        global_batch_size=hp.batch_size,
        n_epochs=hp.n_epochs,
        max_steps=hp.max_steps,
        warmup_ratio=hp.warmup_ratio,
    )
    assert plan.total_steps >= hp.n_epochs
    if cfg.checkpoint_every_steps:
        assert cfg.checkpoint_every_steps <= plan.steps_per_epoch + 1  # about once an epoch
    if res.gpus_per_worker:
        assert res.strategy in ("fsdp", "auto") and cfg.gradient_checkpointing
        assert cfg.mixed_precision == "bf16"


def test_auto_picks_fsdp_for_32b_on_80gb_gpus_and_ddp_for_the_tiny_model(tiny_dir: Path) -> None:
    from transformers import AutoConfig, Qwen2Config

    big = ModelShape.from_config(Qwen2Config(**QWEN25_32B))
    assert 32.0e9 < big.n_params < 33.5e9  # Qwen2.5-32B: 32.8B parameters
    common = {"block_size": 32768, "activation_checkpointing": True}
    assert choose_strategy(big, world_size=16, capacity_bytes=80e9, **common) == "fsdp"
    assert choose_strategy(big, world_size=1, capacity_bytes=80e9, **common) == "ddp"  # alone
    tiny = ModelShape.from_config(AutoConfig.from_pretrained(tiny_dir))
    assert choose_strategy(tiny, world_size=2, capacity_bytes=4e9, block_size=128) == "ddp"
    ddp = estimate_memory(big, strategy="ddp", world_size=16, **common)
    fsdp = estimate_memory(big, strategy="fsdp", world_size=16, **common)
    assert fsdp.states == pytest.approx(ddp.states / 16)


def test_model_shape_counts_the_parameters_of_a_real_model(tiny_dir: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, Qwen2Config

    for config in (
        AutoConfig.from_pretrained(tiny_dir),
        Qwen2Config(**(QWEN25_32B | {"num_hidden_layers": 2, "vocab_size": 1000})),
    ):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        assert ModelShape.from_config(config).n_params == sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- R1-distill tokenizer

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"  # noqa: RUF001  (R1's own)
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"  # noqa: RUF001
R1_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}" + USER + "{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}" + ASSISTANT + "{{ m['content'] }}" + EOS + "{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}" + ASSISTANT + "<think>\n{% endif %}"
)


def r1_style_tokenizer() -> Any:
    """Shaped like DeepSeek-R1-Distill-Qwen's: pad is end of sentence, <think> and </think>
    are added tokens, Qwen's reserved <|fim_pad|> is there and <|endoftext|> is not."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=[BOS, EOS, USER, ASSISTANT, "<|fim_pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["What is 2 plus 3? Two plus three is five. Answer: 5"] * 50, trainer)
    tok.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t in ("<think>", "</think>")]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS
    )
    fast.chat_template = R1_TEMPLATE
    return fast


def test_the_r1_distill_recipe_trains_with_an_r1_style_tokenizer(tmp_path: Path) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from thinkforge.jobs.data import IGNORE_INDEX, collate, ensure_pad_token, load_examples

    tokenizer = r1_style_tokenizer()
    assert "<|endoftext|>" not in tokenizer.get_vocab()
    assert tokenizer.pad_token == tokenizer.eos_token == EOS
    rows = [
        {
            "question": f"What is {a} plus 3?",
            "deepseek_thinking_trajectory": f"{a} plus three is {a + 3}.",
            "deepseek_attempt": f"Answer: {a + 3}",
        }
        for a in range(4)
    ]
    data = tmp_path / "s1k-1.1.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = next(p for p in RECIPES if p.stem == "r1-distill-qwen-7b")
    cfg = SFTConfig.from_yaml(recipe, overrides=[f"dataset={data}"])
    ensure_pad_token(tokenizer)  # what every training worker does first
    assert tokenizer.pad_token == "<|fim_pad|>" != tokenizer.eos_token
    examples, stats = load_examples(
        cfg.dataset, tokenizer, fmt=cfg.format, template=cfg.template, block_size=cfg.block_size
    )
    assert stats.kept == 4
    for example in examples:
        trained = [t for t in example.labels if t != IGNORE_INDEX]
        text = tokenizer.decode(trained)
        assert text.startswith(" ") is False and "</think>" in text
        assert trained[-1] == tokenizer.eos_token_id  # the model learns to stop
        prompt = tokenizer.decode(example.input_ids[: len(example.input_ids) - len(trained)])
        assert prompt.endswith(ASSISTANT + "<think>\n") and prompt.count("<think>") == 1
    batch = collate(examples, tokenizer.pad_token_id)
    assert (batch["input_ids"] == tokenizer.pad_token_id).any()  # padded, and...
    assert not (batch["labels"] == tokenizer.pad_token_id).any()  # ...padding is not trained
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1,
    )  # fmt: skip
    model = Qwen2ForCausalLM(config)
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)


# ---------------------------------------------------------------- LIMO on Qwen2.5

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# Qwen2.5-Instruct's ChatML: the generation prompt does not open thinking.
CHATML = (
    "{% for m in messages %}" + IM_START + "{{ m['role'] }}\n{{ m['content'] }}" + IM_END + "\n"
    "{% endfor %}{% if add_generation_prompt %}" + IM_START + "assistant\n{% endif %}"
)


def qwen25_style_tokenizer() -> Any:
    """Shaped like Qwen2.5's: ChatML special tokens, and <think> / </think> are plain text
    (no added tokens), so </think> is several ordinary tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["What is 2 plus 3? Two plus three is five. Answer: 5"] * 50, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=IM_END, pad_token="<|endoftext|>"
    )
    fast.chat_template = CHATML
    return fast


def test_the_limo_recipe_closes_thinking_with_the_whole_plain_text_tag(tmp_path: Path) -> None:
    """Training renders "</think>" as text and trains all of it; fed the same tokens, the
    serving side ends thinking at that whole tag, not at the "</" inside the solution."""
    from thinkforge.jobs.config import TemplateFamily
    from thinkforge.jobs.data import IGNORE_INDEX, ensure_pad_token, load_examples
    from thinkforge.serve.budget import BudgetState, Phase, ThinkingBudget
    from thinkforge.serve.engine import delimiters_for

    tokenizer = qwen25_style_tokenizer()
    encode = tokenizer.encode
    assert len(encode("</think>", add_special_tokens=False)) > 1  # plain text
    rows = [
        {"question": f"What is {a} plus 3?", "solution": f"{a} plus 3 </b> is {a + 3}.",
         "answer": str(a + 3)}
        for a in range(3)
    ]  # fmt: skip
    data = tmp_path / "limo.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = next(p for p in RECIPES if p.stem == "limo-qwen2.5-32b")
    cfg = SFTConfig.from_yaml(recipe, overrides=[f"dataset={data}"])
    ensure_pad_token(tokenizer)
    examples, _ = load_examples(
        cfg.dataset, tokenizer, fmt=cfg.format, template=cfg.template, block_size=cfg.block_size
    )
    template = TemplateFamily(cfg.template)
    spec = delimiters_for(
        template,
        lambda text: list(encode(text, add_special_tokens=False)),
        [tokenizer.eos_token_id],
        atomic_ids=tokenizer.added_tokens_decoder.keys(),
    )
    assert spec.end_text == "</think>"
    for row, example in zip(rows, examples, strict=True):
        trained = [t for t in example.labels if t != IGNORE_INDEX]
        text = f"<think>\n{row['solution']}\n</think>\n{row['answer']}{IM_END}"
        assert tokenizer.decode(trained) == text  # the whole tag is trained, once
        state = BudgetState(
            spec, ThinkingBudget(), prompt_opened_thinking=False, decode=tokenizer.decode
        )
        steps = [state.advance(t) for t in trained]
        assert [s.token_id for s in steps] == trained  # nothing forced, nothing rolled back
        final: list[Phase | None] = []  # each token's phase once held ones are settled
        for step in steps:
            held = [i for i, p in enumerate(final) if p is None]
            for i, phase in zip(held, step.settled, strict=False):
                final[i] = phase
            final.append(None if step.held else step.phase)
        thinking = [t for t, p in zip(trained, final, strict=True) if p is Phase.THINKING]
        assert tokenizer.decode(thinking).strip() == row["solution"]  # "</b>" stayed in
        assert state.done and state.summary().closed
        assert state.summary().tokens == len(thinking)
