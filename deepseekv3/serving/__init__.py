"""Serving: a continuous-batching engine with an output-length predictor, a self-tuning scheduler, a prefix cache
and model routing, behind an OpenAI-compatible HTTP server (`deepseekv3 serve MODEL_DIR`)."""

from .engine import (
    Engine,
    EngineConfig,
    EngineFaultError,
    EngineHealth,
    EngineOverloadedError,
    EngineStoppedError,
    GenerationResult,
    RequestHandle,
    RequestTimeoutError,
    RequestTooLargeError,
)
from .length_predictor import LengthPredictor, LengthPredictorConfig, LengthRecord
from .prefix_cache import PrefixCache, PrefixEntry
from .scheduler import SchedulerSetting, SelfTuningScheduler, UCBBandit

__all__ = [
    "Engine",
    "EngineConfig",
    "EngineFaultError",
    "EngineHealth",
    "EngineOverloadedError",
    "EngineStoppedError",
    "GenerationResult",
    "LengthPredictor",
    "LengthPredictorConfig",
    "LengthRecord",
    "PrefixCache",
    "PrefixEntry",
    "RequestHandle",
    "RequestTimeoutError",
    "RequestTooLargeError",
    "SchedulerSetting",
    "SelfTuningScheduler",
    "UCBBandit",
]
