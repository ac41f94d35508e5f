"""What `deepseekv3 serve MODEL_DIR` builds: the model and processor from a saved directory, an engine (or a router
with a lite model), the engine's saved state, warm system prompts, and the HTTP server around them."""

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoProcessor

from .engine import Engine, EngineConfig
from .router import Router
from .server import ChatServer, ServerConfig

__all__ = ["build_server", "resolve_device", "resolve_dtype"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The device to serve on: `device`, checked to exist here, or by default CUDA when available, else the CPU.

    Args:
        device (`str` or `torch.device`, *optional*): `"cpu"`, `"cuda"`, `"cuda:1"`, `"mps"`, ...

    Raises:
        `ValueError`: the name is not a device, or this machine has no such device.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"device {device!r} is not a torch device ({error})") from error
    if resolved.type == "cpu":
        return resolved
    backend = getattr(torch, resolved.type, None)
    if resolved.type == "mps":
        backend = torch.backends.mps
    is_available = getattr(backend, "is_available", None)
    if is_available is None or not is_available():
        raise ValueError(f"device {device!r} is not available on this machine (torch finds no {resolved.type})")
    count = getattr(backend, "device_count", lambda: 1)()
    if resolved.index is not None and resolved.index >= count:
        raise ValueError(f"device {device!r} is not available on this machine ({count} {resolved.type} device(s))")
    return resolved


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """The weights' dtype: `dtype`, or for `"auto"` bfloat16 on CUDA and float32 elsewhere.

    Args:
        dtype (`str` or `torch.dtype`): `"auto"`, `"float32"`, `"bfloat16"` or `"float16"` (or that `torch.dtype`).
        device (`torch.device`): where the model will run.

    Raises:
        `ValueError`: another dtype.
    """
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype {dtype} is not one of float32, bfloat16, float16")
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def build_server(
    model_dir: str | Path,
    server_config: ServerConfig,
    engine_config: EngineConfig,
    lite_model_dir: str | Path | None = None,
    engine_state_dir: str | Path | None = None,
    warm_up_system: Sequence[str] = (),
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = "auto",
) -> ChatServer:
    """Loads `model_dir` (model and processor, `save_pretrained` output) and returns a `ChatServer`, not started.

    Args:
        model_dir (`str` or `Path`): the model and its processor.
        server_config (`ServerConfig`), engine_config (`EngineConfig`): settings.
        lite_model_dir (`str` or `Path`, *optional*): a lite model; requests are then routed by `RoutingPolicy()`.
        engine_state_dir (`str` or `Path`, *optional*): `Engine.save_state` output (length predictor, scheduler) for
            the (full model's) engine.
        warm_up_system (`Sequence[str]`): system prompts whose chat rendering is prefilled into the prefix cache.
        device (`str` or `torch.device`, *optional*): where the model (and the lite model) run; defaults to CUDA when
            available, else the CPU (`resolve_device`). An unavailable device raises `ValueError` before loading.
        dtype (`str` or `torch.dtype`, defaults to `"auto"`): the weights' dtype: `"auto"` (bfloat16 on CUDA,
            float32 elsewhere), `"float32"`, `"bfloat16"` or `"float16"` (`resolve_dtype`). Modules the model keeps
            in float32 (`_keep_in_fp32_modules_strict`) stay so.
    """
    import deepseekv3  # noqa: F401  registers the Auto classes

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json: pass a directory written by save_pretrained")
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    model = _load_model(model_dir, device, dtype)
    processor = AutoProcessor.from_pretrained(model_dir)
    if lite_model_dir is not None:
        lite_model = _load_model(lite_model_dir, device, dtype)
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


def _load_model(model_dir: str | Path, device: torch.device, dtype: torch.dtype):
    """`from_pretrained` in `dtype`, its weights loaded straight onto `device`, in eval mode."""
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map=device).eval()
