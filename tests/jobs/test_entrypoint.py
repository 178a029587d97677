"""The job entrypoint's early validation, the import rule, and the pure helpers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from thinkforge.contract import build_manifest, default_registered_name
from thinkforge.jobs.checkpoints import STATE_FILE, list_checkpoints
from thinkforge.jobs.config import SFTConfig
from thinkforge.jobs.sft import EpochSampler, lr_lambda, plan_steps
from thinkforge.jobs.synthetic import write_jsonl
from thinkforge.jobs.tracking import flatten


def run_job(tmp_path: Path, **config: object) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "job.json"
    path.write_text(SFTConfig.model_validate(config).model_dump_json())
    cmd = [sys.executable, "-m", "thinkforge.jobs", "--job-id", "j1", "--config", str(path)]
    cmd += ["--data-dir", str(tmp_path), "--storage-path", str(tmp_path / "ckpt")]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"question": "q"}\n', "line 1: cannot tell the format"),
        ('{"question": "q", "thinking_trajectories": ["t"]}\n', "missing the answer"),
        ("", "has no records"),
        ("not json\n", "line 1: not valid JSON"),
    ],
)
def test_bad_dataset_fails_early_with_one_line(tmp_path: Path, content: str, message: str) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text(content)
    proc = run_job(tmp_path, dataset=str(data))
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("thinkforge job error: dataset ") and message in last
    assert "Traceback" not in proc.stderr


def test_missing_base_model_path_fails_early(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "ok.jsonl", n=4, seed=0)
    proc = run_job(tmp_path, dataset=str(data), model=str(tmp_path / "nope"))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        f"thinkforge job error: base model path {tmp_path / 'nope'} does not exist"
    )


def test_a_base_with_experts_it_cannot_route_fails_early_as_invalid_model(
    tmp_path: Path,
) -> None:
    """What the control plane cannot read before the job (a hub id, a registry version)."""
    from transformers import MixtralConfig

    data = write_jsonl(tmp_path / "ok.jsonl", n=4, seed=0)
    MixtralConfig(num_local_experts=4).save_pretrained(tmp_path / "mixtral")
    proc = run_job(tmp_path, dataset=str(data), model=str(tmp_path / "mixtral"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("thinkforge job error: [invalid_model] base model ")
    assert "'mixtral' is a mixture of experts whose router thinkforge does not know" in last


def test_jobs_never_import_the_control_plane() -> None:
    code = (
        "import sys, thinkforge.jobs.__main__, thinkforge.jobs.sft, thinkforge.jobs.tracking, "
        "thinkforge.jobs.tiny, thinkforge.jobs.synthetic; "
        "bad = [m for m in sys.modules if m == 'sqlalchemy' or m.startswith('thinkforge.platform')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_plan_steps() -> None:
    plan = plan_steps(
        100,
        world_size=2,
        micro_batch_size=4,
        global_batch_size=16,
        n_epochs=3,
        max_steps=None,
        warmup_ratio=0.05,
    )
    assert (plan.accumulation, plan.steps_per_epoch, plan.total_steps, plan.warmup_steps) == (
        2,
        6,
        18,
        1,
    )
    with pytest.raises(ValueError, match="not a multiple"):
        plan_steps(
            100,
            world_size=3,
            micro_batch_size=1,
            global_batch_size=16,
            n_epochs=1,
            max_steps=None,
            warmup_ratio=0,
        )
    with pytest.raises(ValueError, match="fewer than one global batch"):
        plan_steps(
            8,
            world_size=1,
            micro_batch_size=1,
            global_batch_size=16,
            n_epochs=1,
            max_steps=None,
            warmup_ratio=0,
        )


def test_lr_schedule_warms_up_then_decays_to_zero() -> None:
    f = lr_lambda("cosine", warmup_steps=2, total_steps=10)
    assert [f(0), f(1), f(2)] == [0.5, 1.0, 1.0]
    assert f(6) == pytest.approx(0.5) and f(10) == pytest.approx(0.0)
    assert lr_lambda("constant", 0, 10)(9) == 1.0
    assert lr_lambda("linear", 0, 10)(5) == pytest.approx(0.5)


def test_epoch_sampler_is_deterministic_disjoint_and_resumable() -> None:
    ranks = [EpochSampler(10, rank=r, world_size=2, seed=7) for r in range(2)]
    orders = [list(s) for s in ranks]
    assert sorted(orders[0] + orders[1]) == list(range(10))
    assert orders == [list(EpochSampler(10, rank=r, world_size=2, seed=7)) for r in range(2)]
    ranks[0].set_epoch(1)
    assert list(ranks[0]) != orders[0]
    epoch1 = list(ranks[0])
    ranks[0].set_epoch(1, start=3)
    assert list(ranks[0]) == epoch1[3:] and len(ranks[0]) == 2


def test_manifest_flatten_and_names(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("abc")
    (tmp_path / "sub" / "b.bin").write_bytes(b"\0")
    manifest = build_manifest(sorted(p for p in tmp_path.rglob("*") if p.is_file()), tmp_path)
    assert manifest["a.txt"] == {
        "sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
        "size": 3,
    }
    assert set(manifest) == {"a.txt", "sub/b.bin"}
    assert flatten({"a": {"b": 1, "c": None}, "d": "x"}) == {"a.b": "1", "a.c": "", "d": "x"}
    assert default_registered_name("Qwen/Qwen2.5-32B-Instruct") == "qwen2.5-32b-instruct-sft"
    assert default_registered_name("models:/my-sft@production") == "my-sft"
    assert default_registered_name("thinkforge/tiny") == "thinkforge-tiny-sft"
    assert default_registered_name("thinkforge/tiny-moe") == "thinkforge-tiny-moe-sft"


def write_checkpoints(fs: Any, root: str) -> None:
    """Step 2 complete; step 4's state lists a file bigger than what was copied so far."""
    for step, size in ((2, 3), (4, 99)):
        d = f"{root}/j/checkpoint_{step:08d}"
        fs.create_dir(d, recursive=True)
        with fs.open_output_stream(f"{d}/model.safetensors") as out:
            out.write(b"abc")
        state = {
            "step": step,
            "epoch": 0.5,
            "metrics": {"loss": 1.5},
            "files": {"model.safetensors": size},
        }
        with fs.open_output_stream(f"{d}/{STATE_FILE}") as out:
            out.write(json.dumps(state).encode())


@pytest.mark.parametrize("where", ["directory", "file-uri", "object-store"])
def test_list_checkpoints_skips_incomplete(tmp_path: Path, where: str) -> None:
    """Local directories, URIs (what s3:// goes through) and a non-disk store alike."""
    import pyarrow.fs as pafs

    if where == "object-store":  # pyarrow's in-memory filesystem: no local path at all
        fs, storage, shown = pafs._MockFileSystem(), "bucket/ckpt", "bucket/ckpt"
        write_checkpoints(fs, storage)
        found = list_checkpoints(storage, "j", filesystem=fs)
    else:
        write_checkpoints(pafs.LocalFileSystem(), str(tmp_path))
        uri = where == "file-uri"
        storage = f"file://{tmp_path}" if uri else str(tmp_path)
        shown = storage
        found = list_checkpoints(storage, "j")
    assert [(c.step, c.epoch, c.metrics) for c in found] == [(2, 0.5, {"loss": 1.5})]
    assert found[0].path == f"{shown}/j/checkpoint_00000002"


def test_a_worker_failure_is_reported_by_what_the_worker_said() -> None:
    from ray.train import WorkerGroupError

    from thinkforge.jobs.__main__ import training_failure
    from thinkforge.jobs.checkpointing import CheckpointError

    refused = CheckpointError("checkpoint_00000004 was written with global_batch 16")
    error = WorkerGroupError("rank 0 and 1 failed", {1: ValueError("later"), 0: refused})
    assert training_failure(error) == (
        "[checkpoint_incompatible] checkpoint_00000004 was written with global_batch 16"
    )
    traced = RuntimeError("Traceback (most recent call last):\n  ...\nValueError: bad shape")
    assert training_failure(WorkerGroupError("x", {0: traced})) == "ValueError: bad shape"
    assert training_failure(RuntimeError("the controller died\nmore")) == "the controller died"
