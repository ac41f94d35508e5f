"""Model routing: each request goes to the full or the lite model by its complexity (prompt length, media, and an
optional learned classifier); every decision is logged.

`ComplexityClassifier` is a logistic regression on a bag of prompt tokens plus length and media counts, trained on
prompts labelled 1 where the lite model's answer differs from the full model's: it learns which requests the lite
model cannot serve as well.
"""

import math
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import logging

from .engine import Engine, EngineConfig, EngineHealth, EngineStoppedError, RequestHandle
from .sampling import SamplingParams

__all__ = ["ComplexityClassifier", "Router", "RoutingDecision", "RoutingPolicy"]

logger = logging.get_logger(__name__)


class ComplexityClassifier(nn.Module):
    """Probability that a request needs the full model: `sigmoid(w · [bag of tokens, log length, images, clips])`.

    Args:
        vocab_size (`int`): the models' vocabulary size.
    """

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.linear = nn.Linear(vocab_size + 3, 1)

    def features(self, prompts: Sequence[Sequence[int]], media_counts: Sequence[tuple[int, int]]) -> torch.Tensor:
        """`(len(prompts), vocab_size + 3)`: token frequencies, `log(1 + length)`, image and clip counts."""
        rows = []
        for prompt, (num_images, num_clips) in zip(prompts, media_counts):
            bag = torch.bincount(torch.tensor(list(prompt), dtype=torch.long), minlength=self.vocab_size).float()
            extra = torch.tensor([math.log1p(len(prompt)), float(num_images), float(num_clips)])
            rows.append(torch.cat([bag / max(len(prompt), 1), extra]))
        return torch.stack(rows)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features).squeeze(-1)

    def fit(
        self,
        prompts: Sequence[Sequence[int]],
        media_counts: Sequence[tuple[int, int]],
        needs_full: Sequence[bool],
        epochs: int = 200,
        lr: float = 0.1,
    ) -> float:
        """Full-batch Adam on the logistic loss; returns the final training loss."""
        features = self.features(prompts, media_counts)
        labels = torch.tensor([float(value) for value in needs_full])
        optimizer = torch.optim.Adam(self.parameters(), lr=lr)
        for _ in range(epochs):
            loss = nn.functional.binary_cross_entropy_with_logits(self(features), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return loss.item()

    @torch.no_grad()
    def score(self, prompt: Sequence[int], num_images: int, num_clips: int) -> float:
        """Probability that `prompt` needs the full model."""
        return torch.sigmoid(self(self.features([prompt], [(num_images, num_clips)]))).item()


@dataclass
class RoutingPolicy:
    """When a request goes to the full model (otherwise to the lite one).

    Args:
        max_lite_prompt_tokens (`int`, defaults to 256): longer prompts go to the full model.
        media_to_full (`bool`, defaults to `True`): prompts with images or audio go to the full model.
        classifier (`ComplexityClassifier`, *optional*): requests it scores at or above `classifier_threshold` go
            to the full model.
        classifier_threshold (`float`, defaults to 0.5).
    """

    max_lite_prompt_tokens: int = 256
    media_to_full: bool = True
    classifier: ComplexityClassifier | None = None
    classifier_threshold: float = 0.5


@dataclass
class RoutingDecision:
    """One logged routing decision."""

    request_id: int
    model: str
    reason: str
    prompt_length: int
    num_images: int
    num_clips: int
    score: float | None


class Router:
    """Sends each request to an engine on the full or on the lite model, by `policy`; logs every decision.

    Args:
        full_model, lite_model (`PreTrainedModel`): the two models (same tokenizer and vocabulary).
        policy (`RoutingPolicy`, *optional*): routing rules; defaults to `RoutingPolicy()`.
        engine_config (`EngineConfig`, *optional*): settings of both engines.
        log_size (`int`, defaults to 10000): decisions kept in `decisions`.
    """

    def __init__(
        self,
        full_model: PreTrainedModel,
        lite_model: PreTrainedModel,
        policy: RoutingPolicy | None = None,
        engine_config: EngineConfig | None = None,
        log_size: int = 10_000,
    ):
        if full_model.config.vocab_size != lite_model.config.vocab_size:
            raise ValueError(
                f"the full and lite models need one vocabulary: vocab_size {full_model.config.vocab_size} vs "
                f"{lite_model.config.vocab_size}"
            )
        self.policy = policy or RoutingPolicy()
        self.engines = {"full": Engine(full_model, engine_config), "lite": Engine(lite_model, engine_config)}
        self.decisions: deque[RoutingDecision] = deque(maxlen=log_size)
        self._next_id = 0
        self._id_lock = threading.Lock()  # route() runs on every HTTP thread
        self._is_stopping = False

    @property
    def num_pending(self) -> int:
        return sum(engine.num_pending for engine in self.engines.values())

    @property
    def num_active(self) -> int:
        return sum(engine.num_active for engine in self.engines.values())

    @property
    def health(self) -> EngineHealth:
        """Both engines' health: healthy when both are; the reasons and faults named by engine."""
        health = {name: engine.health for name, engine in self.engines.items()}
        reasons = [f"{name} model: {state.reason}" for name, state in health.items() if state.reason is not None]
        faults = [f"{name} model: {state.last_fault}" for name, state in health.items() if state.last_fault]
        return EngineHealth(
            not reasons,
            "; ".join(reasons) or None,
            sum(state.faults for state in health.values()),
            "; ".join(faults) or None,
        )

    def route(self, inputs: Mapping[str, torch.Tensor] | Sequence[int]) -> RoutingDecision:
        """Decides (and logs) where a request goes, without submitting it."""
        input_ids, media = self.engines["full"].parse_inputs(inputs)
        num_images = len(media.get("pixel_values", []))
        num_clips = len(media.get("input_features", []))
        policy, score = self.policy, None
        if policy.media_to_full and (num_images or num_clips):
            model, reason = "full", "media"
        elif len(input_ids) > policy.max_lite_prompt_tokens:
            model, reason = "full", f"prompt longer than {policy.max_lite_prompt_tokens} tokens"
        elif policy.classifier is not None:
            score = policy.classifier.score(input_ids, num_images, num_clips)
            is_complex = score >= policy.classifier_threshold
            model, reason = ("full" if is_complex else "lite"), "classifier"
        else:
            model, reason = "lite", "short text prompt"
        with self._id_lock:
            request_id = self._next_id
            self._next_id += 1
        decision = RoutingDecision(request_id, model, reason, len(input_ids), num_images, num_clips, score)
        self.decisions.append(decision)
        logger.info(f"routing request {decision.request_id} to the {model} model ({reason})")
        return decision

    def submit(
        self,
        inputs: Mapping[str, torch.Tensor] | Sequence[int],
        max_new_tokens: int | None = None,
        timeout_s: float | None = None,
        *,
        sampling: SamplingParams | None = None,
    ) -> RequestHandle:
        """Routes and submits one request (see `Engine.submit`)."""
        if self._is_stopping:
            raise EngineStoppedError("the engines are stopping")
        decision = self.route(inputs)
        return self.engines[decision.model].submit(inputs, max_new_tokens, timeout_s, sampling=sampling)

    def start(self) -> "Router":
        self._is_stopping = False
        for engine in self.engines.values():
            engine.start()
        return self

    def stop(self, drain_timeout_s: float = 0.0) -> None:
        """Stops both engines (see `Engine.stop`): `submit` raises `EngineStoppedError` from the call on, and both
        engines drain within the one `drain_timeout_s`."""
        self._is_stopping = True
        deadline = time.monotonic() + drain_timeout_s
        for engine in self.engines.values():
            engine.stop(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> "Router":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def run_until_idle(self) -> None:
        """Steps both engines in the current thread until both are idle."""
        for engine in self.engines.values():
            engine.run_until_idle()
