"""Serving: a continuous-batching engine with per-request sampling, an output-length predictor, a self-tuning
scheduler, a prefix cache and model routing, behind an OpenAI-compatible HTTP server (`deepseekv3 serve MODEL_DIR`)."""

from .absorbed_attention import absorbed_decoding
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
from .sampling import SamplingParams
from .scheduler import SchedulerSetting, SelfTuningScheduler, UCBBandit

__all__ = [
    "absorbed_decoding",
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
    "SamplingParams",
    "SchedulerSetting",
    "SelfTuningScheduler",
    "UCBBandit",
]
