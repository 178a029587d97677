"""The contract between jobs, platform and serve: manifest check, model refs, log lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from thinkforge.contract import (
    MANIFEST_FILE,
    ModelRef,
    build_manifest,
    check_manifest,
    emit_error,
    emit_event,
    error_line,
    event_line,
    find_error,
    manifest_bytes,
    parse_event,
    sha256_file,
)


@pytest.fixture
def version_dir(tmp_path: Path) -> tuple[Path, str]:
    """A model folder as a registered version holds it, and its manifest's sha256."""
    root = tmp_path / "model"
    (root / "tokenizer").mkdir(parents=True)
    (root / "model.safetensors").write_bytes(b"\x00weights" * 100)
    (root / "config.json").write_text('{"a": 1}')
    (root / "tokenizer" / "tokenizer.json").write_text("{}")
    files = sorted(p for p in root.rglob("*") if p.is_file())
    (root / MANIFEST_FILE).write_bytes(manifest_bytes(build_manifest(files, root)))
    return root, sha256_file(root / MANIFEST_FILE)


def test_an_intact_version_passes(version_dir: tuple[Path, str]) -> None:
    root, sha = version_dir
    assert check_manifest(root, manifest_sha256=sha) == []
    manifest = json.loads((root / MANIFEST_FILE).read_text())
    assert set(manifest) == {"config.json", "model.safetensors", "tokenizer/tokenizer.json"}
    assert manifest["config.json"] == {"sha256": sha256_file(root / "config.json"), "size": 8}
    # MLflow's client adds this file to every models:/ download; it is not the version's.
    (root / "registered_model_meta").write_text("model_name: x\n")
    assert check_manifest(root, manifest_sha256=sha) == []


def test_a_stray_file_is_refused(version_dir: tuple[Path, str]) -> None:
    root, sha = version_dir
    (root / "tokenizer" / "extra.py").write_text("import os")
    assert check_manifest(root, manifest_sha256=sha) == [
        "tokenizer/extra.py: in the folder but not in the manifest"
    ]


def test_a_missing_file_is_refused(version_dir: tuple[Path, str]) -> None:
    root, sha = version_dir
    (root / "tokenizer" / "tokenizer.json").unlink()
    assert check_manifest(root, manifest_sha256=sha) == [
        "tokenizer/tokenizer.json: missing from the folder"
    ]


def test_a_changed_file_is_refused(version_dir: tuple[Path, str]) -> None:
    root, sha = version_dir
    (root / "config.json").write_text('{"a": 2}')  # same size, other bytes
    (root / "model.safetensors").write_bytes(b"short")
    assert check_manifest(root, manifest_sha256=sha) == [
        "config.json: sha256 differs from the manifest",
        "model.safetensors: size 5 differs from the manifest's",
    ]


def test_the_manifest_itself_is_pinned(version_dir: tuple[Path, str]) -> None:
    root, sha = version_dir
    (root / "config.json").write_text('{"b": 2}')
    manifest = build_manifest(sorted(p for p in root.rglob("*.json") if p.is_file()), root)
    manifest.pop(MANIFEST_FILE)
    (root / MANIFEST_FILE).write_bytes(manifest_bytes(manifest))  # re-signed by a tamperer
    assert check_manifest(root, manifest_sha256=sha) == [
        "manifest.json: sha256 differs from the version's tag"
    ]
    (root / MANIFEST_FILE).unlink()
    assert check_manifest(root) == ["manifest.json: missing"]
    (root / MANIFEST_FILE).write_text("[1, 2]")
    assert check_manifest(root) == ["manifest.json: not a valid manifest"]


@pytest.mark.parametrize(
    ("text", "ref"),
    [
        ("models:/tiny-sft@production", ModelRef("tiny-sft", alias="production")),
        ("models:/tiny-sft/3", ModelRef("tiny-sft", version=3)),
        ("tiny-sft@staging_2", ModelRef("tiny-sft", alias="staging_2")),
        ("  tiny.v2/12 ", ModelRef("tiny.v2", version=12)),
        ("org/tiny-sft/12", ModelRef("org/tiny-sft", version=12)),
        ("Qwen-7B-sft@v1-rc", ModelRef("Qwen-7B-sft", alias="v1-rc")),
    ],
)
def test_model_ref_forms(text: str, ref: ModelRef) -> None:
    assert ModelRef.parse(text) == ref
    assert ModelRef.parse(str(ref)) == ref  # str() writes the canonical form back


@pytest.mark.parametrize(
    "bad",
    ["tiny-sft", "tiny-sft/0", "tiny-sft/x", "@prod", "tiny-sft@", "a@b c", "/3", "a@v1.2",
     "a@prod/3", "models:/", "a@" + "x" * 256, "a@pröd"],
)  # fmt: skip
def test_model_ref_grammar_refuses(bad: str) -> None:
    """Aliases follow MLflow's rule for alias names: ASCII word characters and "-"."""
    with pytest.raises(ValueError, match="NAME/VERSION"):
        ModelRef.parse(bad)


def test_a_pinned_ref_names_its_version() -> None:
    ref = ModelRef("sums", 3, "production", "file:///a/model", "f" * 64)
    assert ref.model_uri == "models:/sums/3" and str(ref) == "models:/sums@production"


def test_event_lines_round_trip(capsys: pytest.CaptureFixture[str]) -> None:
    line = event_line("checkpoint", step=4, loss=1.5)
    assert line == 'THINKFORGE_EVENT {"event": "checkpoint", "loss": 1.5, "step": 4}'
    assert parse_event(line) == {"event": "checkpoint", "loss": 1.5, "step": 4}
    for other in ("THINKFORGE_EVENT not json", 'THINKFORGE_EVENT {"step": 1}', "loss 1.5"):
        assert parse_event(other) is None
    emit_event("trained", step=16)
    assert parse_event(capsys.readouterr().out.strip()) == {"event": "trained", "step": 16}


def test_the_last_error_line_is_the_jobs_last_word(capsys: pytest.CaptureFixture[str]) -> None:
    emit_error("the dataset is empty: upload one with records")
    err = capsys.readouterr().err
    assert err == "thinkforge job error: the dataset is empty: upload one with records\n"
    logs = f"Traceback ...\n{error_line('first')}\nmore\n{err}"
    assert find_error(logs) == "the dataset is empty: upload one with records"
    assert find_error("no error here") is None and find_error(None) is None
