"""What `deepseekv3 serve MODEL_DIR` builds: the model and processor from a saved directory, an engine (or a router
with a lite model), the engine's saved state, warm system prompts, and the HTTP server around them."""

from collections.abc import Sequence
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoProcessor

from .engine import Engine, EngineConfig
from .router import Router
from .server import ChatServer, ServerConfig

__all__ = ["build_server"]


def build_server(
    model_dir: str | Path,
    server_config: ServerConfig,
    engine_config: EngineConfig,
    lite_model_dir: str | Path | None = None,
    engine_state_dir: str | Path | None = None,
    warm_up_system: Sequence[str] = (),
) -> ChatServer:
    """Loads `model_dir` (model and processor, `save_pretrained` output) and returns a `ChatServer`, not started.

    Args:
        model_dir (`str` or `Path`): the model and its processor.
        server_config (`ServerConfig`), engine_config (`EngineConfig`): settings.
        lite_model_dir (`str` or `Path`, *optional*): a lite model; requests are then routed by `RoutingPolicy()`.
        engine_state_dir (`str` or `Path`, *optional*): `Engine.save_state` output (length predictor, scheduler) for
            the (full model's) engine.
        warm_up_system (`Sequence[str]`): system prompts whose chat rendering is prefilled into the prefix cache.
    """
    import deepseekv3  # noqa: F401  registers the Auto classes

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json: pass a directory written by save_pretrained")
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    if lite_model_dir is not None:
        lite_model = AutoModelForCausalLM.from_pretrained(lite_model_dir).eval()
        backend: Engine | Router = Router(model, lite_model, engine_config=engine_config)
        engines = list(backend.engines.values())
    else:
        backend = Engine(model, engine_config)
        engines = [backend]
    if engine_state_dir is not None:
        engines[0].load_state(engine_state_dir)
    prefixes = [
        processor.tokenizer(
            processor.apply_chat_template([{"role": "system", "content": text}], tokenize=False),
            add_special_tokens=False,
        )["input_ids"]
        for text in warm_up_system
    ]
    if prefixes:
        for engine in engines:
            engine.warm_up(prefixes)
    return ChatServer(backend, processor, server_config)
