"""thinkforge.serve: serve fine-tuned reasoning models with budget forcing on Ray Serve.

Importing this package stays light (pydantic only): the Serve application, the replica
and the loader import Ray, torch and MLflow, so they load on first use.

    from thinkforge.serve import ModelServeConfig, ThinkingParams, build_app
    serve.run(build_app({"models": [{"name": "s1", "model_path": "/models/s1"}]}))

Serve configs use the import path ``thinkforge.serve.app:build_app``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from thinkforge.serve.config import (
    EffortBudgets,
    ModelServeConfig,
    ReasoningEffort,
    TemplateFamily,
    ThinkingParams,
)

if TYPE_CHECKING:
    from thinkforge.serve.app import AppArgs, build_app
    from thinkforge.serve.loader import ModelRef, fetch, resolve

__all__ = [
    "AppArgs",
    "EffortBudgets",
    "ModelRef",
    "ModelServeConfig",
    "ReasoningEffort",
    "TemplateFamily",
    "ThinkingParams",
    "build_app",
    "fetch",
    "resolve",
]

_LAZY = {
    "AppArgs": "thinkforge.serve.app",
    "build_app": "thinkforge.serve.app",
    "ModelRef": "thinkforge.serve.loader",
    "fetch": "thinkforge.serve.loader",
    "resolve": "thinkforge.serve.loader",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'thinkforge.serve' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
