"""Inference engines behind the ``thinkforge.serve.engine.Engine`` Protocol.

Imported lazily so that choosing an engine loads only its own heavy dependencies:

    engine = create_engine(cfg)     # cfg: ModelServeConfig
    engine.load()
"""

from __future__ import annotations

from thinkforge.serve.config import LORA_ENGINE_HELP, EngineName, ModelServeConfig
from thinkforge.serve.engine import Engine

__all__ = ["create_engine"]


def create_engine(
    cfg: ModelServeConfig,
    adapters: dict[str, str] | None = None,
    default_adapter: str | None = None,
) -> Engine:
    """``adapters``: LoRA adapter name -> directory, over ``cfg.model_path`` as their base
    (transformers engine only)."""
    if adapters and cfg.engine is not EngineName.TRANSFORMERS:
        raise NotImplementedError(LORA_ENGINE_HELP)
    if cfg.engine is EngineName.TRANSFORMERS:
        from thinkforge.serve.engines.transformers import TransformersEngine

        return TransformersEngine(
            cfg.model_path,
            template=cfg.template,
            device=cfg.device,
            dtype=cfg.dtype,
            max_batch_size=cfg.max_batch_size,
            adapters=adapters,
            default_adapter=default_adapter,
        )
    if cfg.engine is EngineName.VLLM:
        from thinkforge.serve.engines.vllm import VllmEngine

        return VllmEngine(
            cfg.model_path,
            template=cfg.template,
            device=cfg.device,
            dtype=cfg.dtype,
            max_batch_size=cfg.max_batch_size,
            engine_args=cfg.engine_args.vllm_kwargs() if cfg.engine_args else None,
        )
    raise NotImplementedError(f"engine {cfg.engine.value!r} is not available in this build")
