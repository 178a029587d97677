"""Shared fixtures for the jobs tests: one tiny model built per session."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from thinkforge.jobs.data import ensure_pad_token
from thinkforge.jobs.tiny import ensure_tiny_model


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("thinkforge-data")


@pytest.fixture(scope="session")
def tiny_dir(data_dir: Path) -> Path:
    return ensure_tiny_model(data_dir)


@pytest.fixture(scope="session")
def tokenizer(tiny_dir: Path) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    ensure_pad_token(tok)
    return tok
