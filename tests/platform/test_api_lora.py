"""LoRA as a job method over the REST API: accepted settings reach the job's config and
come back on the job; bad ones are refused with 400 naming the field, writing nothing."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from tests.platform.conftest import Api
from tests.platform.data import S1K, jsonl
from tests.platform.test_api_files import assert_error, upload
from thinkforge.jobs.config import LoRA, SFTConfig, unknown_targets
from thinkforge.platform.reconciler import _failure_kind
from thinkforge.platform.status import FailureKind


@pytest.fixture
def file_id(api: Api) -> str:
    return str(upload(api, jsonl(S1K, S1K)).json()["id"])


def create(api: Api, file_id: str, lora: dict[str, Any], **fields: Any) -> httpx.Response:
    body = {
        "model": "thinkforge/tiny",
        "training_file": file_id,
        "method": {"type": "supervised", "supervised": {"lora": lora}},
        **fields,
    }
    return api.client.post("/v1/fine_tuning/jobs", json=body)


def test_lora_settings_reach_the_config_and_the_job(api: Api, file_id: str) -> None:
    lora = {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "down_proj"]}
    resp = create(api, file_id, lora, resources={"num_workers": 2, "strategy": "fsdp"})
    assert resp.status_code == 200, resp.text
    job = resp.json()
    assert job["config"]["lora"] == {**lora, "merge": False}
    assert job["method"]["supervised"]["lora"] == {**lora, "merge": False}
    got = api.client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
    assert got["method"]["supervised"]["lora"]["r"] == 4
    plain = api.client.post(
        "/v1/fine_tuning/jobs", json={"model": "thinkforge/tiny", "training_file": file_id}
    ).json()
    assert plain["method"]["supervised"]["lora"] is None and plain["config"]["lora"] is None


@pytest.mark.parametrize(
    ("lora", "param", "named"),
    [
        ({"r": 0}, "method.supervised.lora.r", None),
        ({"r": -4}, "method.supervised.lora.r", None),
        ({"alpha": 0}, "method.supervised.lora.alpha", None),
        ({"dropout": 1.0}, "method.supervised.lora.dropout", None),
        ({"target_modules": []}, "method.supervised.lora.target_modules", None),
        ({"target_modules": ["q_proj; rm"]}, "method.supervised.lora.target_modules", "q_proj"),
        ({"bogus": 1}, "method.supervised.lora.bogus", None),
        (
            {"target_modules": ["q_proj", "qkv_proj"]},
            "method.supervised.lora.target_modules",
            "'qkv_proj'",
        ),
    ],
)
def test_bad_lora_settings_are_refused_and_write_nothing(
    api: Api, file_id: str, lora: dict[str, Any], param: str, named: str | None
) -> None:
    error = assert_error(create(api, file_id, lora), 400, param)
    if named is not None:
        assert named in error["message"]
    assert api.client.get("/v1/fine_tuning/jobs").json()["data"] == []
    assert api.launcher.submissions == []


def test_targets_are_checked_against_a_local_base_config(api: Api, file_id: str) -> None:
    base = api.settings.dataset_roots[0] / "base"  # local models must lie under a root
    base.mkdir(parents=True)
    (base / "config.json").write_text(json.dumps({"model_type": "llama"}))
    bad = create(api, file_id, {"target_modules": ["c_attn"]}, model=str(base))
    assert "'c_attn'" in assert_error(bad, 400, "method.supervised.lora.target_modules")["message"]
    (base / "config.json").write_text(json.dumps({"model_type": "gpt2"}))  # not known here:
    ok = create(api, file_id, {"target_modules": ["c_attn"]}, model=str(base))  # the job checks
    assert ok.status_code == 200, ok.text


def test_unknown_targets_by_architecture() -> None:
    assert unknown_targets(["q_proj", "v_proj"], {"model_type": "qwen2"}) == []
    assert unknown_targets(["qkv", "model.layers.0.mlp.up_proj"], {"model_type": "qwen3"}) == [
        "qkv"
    ]
    assert unknown_targets(["gate"], {"model_type": "qwen3_moe"}) == []
    assert unknown_targets(["gate"], {"model_type": "qwen2"}) == ["gate"]
    assert unknown_targets(["anything"], {"model_type": "gpt_neox"}) is None


def test_lora_config_defaults_and_bounds() -> None:
    lora = LoRA()
    assert (lora.r, lora.alpha, lora.dropout, lora.merge) == (8, 16, 0.0, False)
    assert lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert LoRA(target_modules=["q_proj", "q_proj"]).target_modules == ["q_proj"]
    for bad in ({"r": 0}, {"alpha": -1}, {"dropout": -0.1}, {"target_modules": ["a b"]}):
        with pytest.raises(ValidationError):
            LoRA.model_validate(bad)
    cfg = SFTConfig.model_validate({"lora": {"r": 2, "merge": True}})
    assert cfg.lora is not None and cfg.lora.merge
    assert SFTConfig().lora is None


def test_a_job_error_tagged_invalid_model_fails_with_that_code() -> None:
    """The job checks targets against the model itself where the control plane cannot
    (a registry version, a Hugging Face id): its error line carries the code."""
    line = "[invalid_model] lora.target_modules: the base model 'models:/b/1' has no module"
    assert _failure_kind(line) is FailureKind.INVALID_MODEL
    assert _failure_kind("[checkpoint_incompatible] x") is FailureKind.CHECKPOINT_INCOMPATIBLE
    assert _failure_kind("out of memory") is FailureKind.TRAINING_FAILED
