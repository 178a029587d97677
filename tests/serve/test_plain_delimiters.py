"""Budget forcing where ``<think>``/``</think>`` are plain text (LIMO on Qwen2.5), in the
transformers engine: a tokenizer built here from the tiny one without its atomic think
tokens, so ``</think>`` is ``<`` ``/`` ``think`` ``>``.

The model is a real Qwen2 whose weights are set so that it writes a script (attention and
MLP outputs are zero, and the LM head maps each token's embedding to its successors' rows).
Greedy, it thinks "Let me think." and then tries to end with "</think>" every time, so the
waits and rollbacks are certain. Sampled, "</" goes on as "</7" about one time in four: a
"</" in the thinking that must not end it. A random Qwen2 checks the rollback itself
against a fresh forward pass.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from thinkforge.jobs.config import TemplateFamily
from thinkforge.serve.config import ThinkingParams
from thinkforge.serve.engine import (
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    TokenEvent,
    TokenPhase,
)
from thinkforge.serve.engines.transformers import TransformersEngine, _Batch
from thinkforge.serve.engines.vllm import PlainTextDelimiterError

GREEDY = SamplingParams(temperature=0, max_completion_tokens=80)
THOUGHT, ANSWER = "Let me think.", "The answer is 5"
SCRIPT = ["\n", THOUGHT, "</think>", ANSWER, "<|im_end|>"]  # "\n" ends the prompt


def plain_tokenizer() -> Any:
    """The tiny tokenizer without its added <think> tokens: both tags are plain text."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from thinkforge.jobs.tiny import CHAT_TEMPLATE, EOS_TOKEN, PAD_TOKEN, build_tiny_tokenizer

    data = json.loads(build_tiny_tokenizer().backend_tokenizer.to_str())
    data["added_tokens"] = [
        t for t in data["added_tokens"] if t["content"] not in ("<think>", "</think>")
    ]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(data)),
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def qwen2(tokenizer: Any, *, seed: int) -> Any:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def scripted(tokenizer: Any) -> Any:
    """Greedy decoding follows SCRIPT; "Wait" is followed by the thought again; sampled,
    "/" is followed by "7" (then "<" again) a quarter of the time."""
    model = qwen2(tokenizer, seed=0)

    def encode(text: str) -> list[int]:
        ids: list[int] = tokenizer.encode(text, add_special_tokens=False)
        return ids

    ids = [t for part in SCRIPT for t in encode(part)]
    successor = {a: [(b, 4.0)] for a, b in itertools.pairwise(ids)}
    assert len(successor) == len(ids) - 1, "the script must use each token once"
    (wait,), (slash,), (seven,), (less,) = encode("Wait"), encode("/"), encode("7"), encode("<")
    successor[wait] = [(ids[1], 4.0)]
    successor[slash].append((seven, 3.9))  # exp(-0.1 * |hidden|) ~ 1/3 of "think"'s odds
    successor[seven] = [(less, 4.0)]
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed = model.model.embed_tokens.weight
        embed.normal_()
        head = model.lm_head.weight
        head.zero_()
        for token, afters in successor.items():
            for after, weight in afters:
                head[after] += weight * torch.nn.functional.normalize(embed[token], dim=0)
    return model


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> TransformersEngine:
    directory = tmp_path_factory.mktemp("plain-think")
    tokenizer = plain_tokenizer()
    scripted(tokenizer).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    engine = TransformersEngine(str(directory), template=TemplateFamily.R1, max_batch_size=4)
    engine.load()
    return engine


def prompt(engine: TransformersEngine) -> list[int]:
    encoded = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Sum: 2 3"}],
        add_generation_prompt=True,
        enable_thinking=True,
        thinking_family="r1",
    )
    return list(encoded["input_ids"])


def generate(engine: TransformersEngine, **budgets: int) -> tuple[GenerationResult, list[Any]]:
    request = GenerationRequest("r", prompt(engine), GREEDY, ThinkingParams(**budgets))
    events = list(engine.generate([request]))
    result = events[-1]
    assert isinstance(result, GenerationResult)
    return result, [e for e in events if isinstance(e, TokenEvent)]


def test_the_tokenizer_and_the_spec_see_a_plain_text_delimiter(engine: TransformersEngine) -> None:
    spec = engine.spec
    assert spec is not None and spec.end_text == "</think>"
    assert [engine.tokenizer.decode([t]) for t in spec.end] == ["<", "/", "think", ">", "\n"]


@pytest.mark.parametrize(
    ("budgets", "waits"),
    [({}, 0), ({"num_waits": 2}, 2), ({"min_tokens": 6}, 1), ({"min_tokens": 10}, 2)],
)
def test_waits_replace_the_whole_plain_text_delimiter(
    engine: TransformersEngine, budgets: dict[str, int], waits: int
) -> None:
    result, events = generate(engine, **budgets)
    thought = "Wait".join([THOUGHT] * (waits + 1))
    assert result.reasoning_text == thought  # no "<", "</", "</think" left behind
    assert result.content_text == ANSWER
    text = engine.tokenizer.decode(result.token_ids)
    assert text == thought + "</think>" + ANSWER + "<|im_end|>"
    assert text.count("<") == 2  # the delimiter and the end of turn, once each
    n_thought = len(engine._encode(THOUGHT))
    assert result.thinking.tokens == result.usage.reasoning_tokens == (n_thought + 1) * waits + 4
    assert (result.thinking.waits_inserted, result.thinking.closed) == (waits, True)
    assert result.usage.completion_tokens == len(result.token_ids)
    # The events are an exact account: replaying their rollbacks gives the result.
    replay: list[int] = []
    for event in events:
        del replay[len(replay) - event.rollback :]
        replay.append(event.token_id)
    assert replay == result.token_ids
    assert sum(e.rollback for e in events) == 3 * waits  # "<" "/" "think" each time
    assert "".join(e.reasoning for e in events) == thought
    assert not any(e.content for e in events if e.phase is TokenPhase.REASONING)


def test_a_plain_text_lt_slash_in_the_thinking_does_not_end_it(
    engine: TransformersEngine,
) -> None:
    tail = engine._encode("</think>" + ANSWER)
    kept = 0
    for seed in range(6):
        sampling = SamplingParams(temperature=1.0, seed=seed, max_completion_tokens=120)
        thinking = ThinkingParams(num_waits=2)
        request = GenerationRequest("s", prompt(engine), sampling, thinking)
        result = next(e for e in engine.generate([request]) if isinstance(e, GenerationResult))
        reasoning = result.reasoning_text
        kept += reasoning.count("</7")
        # Every "<" left in the thinking is a "</7"; the delimiter closes it, once.
        assert "<" not in reasoning.replace("</7", ""), reasoning
        assert reasoning.count("Wait") == result.thinking.waits_inserted == 2
        assert result.content_text == ANSWER
        assert engine.tokenizer.decode(result.token_ids).count("</think>") == 1
        thought = len(result.token_ids) - len(tail) - 1  # before "</think>...<|im_end|>"
        assert result.thinking.tokens == result.usage.reasoning_tokens == thought
    assert kept >= 2  # "</" really occurred in the thinking, and stayed there


def test_max_tokens_stays_exact_over_a_held_delimiter(engine: TransformersEngine) -> None:
    n_thought = len(engine._encode(THOUGHT))
    # The cap falls on "<": it is held as a possible delimiter, counted as thinking, and
    # the delimiter is forced after it.
    result, _ = generate(engine, max_tokens=n_thought + 1, num_waits=5)
    assert result.thinking.tokens == result.usage.reasoning_tokens == n_thought + 1
    assert result.thinking.forced_end
    assert result.reasoning_text == THOUGHT + "<"


def test_a_rollback_leaves_the_cache_as_a_fresh_forward_would(tmp_path: Path) -> None:
    tokenizer = plain_tokenizer()
    model = qwen2(tokenizer, seed=1)  # random: every output depends on the whole context
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    engine = TransformersEngine(str(tmp_path), template=TemplateFamily.R1)
    engine.load()
    prompts = [[5, 40, 41, 42], [6, 43]]
    batch = _Batch(engine.model, engine._cache_arg, engine._pad_id(), None)
    batch.add([engine._row(GenerationRequest(str(i), p)) for i, p in enumerate(prompts)])
    batch.feed([30, 50])
    batch.feed([17, 51])
    batch.rollback(0, 2)  # row 0 drops "<" "/"; row 1 keeps its tokens
    batch.feed([60, 52])
    batch.feed([61, 53])
    for i, context in enumerate([prompts[0] + [60, 61], prompts[1] + [50, 51, 52, 53]]):
        with torch.inference_mode():
            fresh = engine.model(input_ids=torch.tensor([context])).logits[0, -1]
        torch.testing.assert_close(batch.logits[i], fresh.float(), atol=1e-4, rtol=1e-4)


def test_vllm_refuses_a_plain_text_delimiter_at_load(
    engine: TransformersEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from thinkforge.serve.engines import vllm

    # The refusal comes before vLLM is imported, so it is checked without vLLM installed.
    monkeypatch.setattr(vllm, "_vllm_available", lambda: True)
    with pytest.raises(PlainTextDelimiterError, match="engine 'transformers'"):
        vllm.VllmEngine(engine.model_path, template=TemplateFamily.R1).load()
