"""Per-request sampling for the serving engine: `SamplingParams` (temperature, top-p, top-k, OpenAI's presence and
frequency penalties, a seed) become transformers' logits processors and a `torch.Generator` of the request's own
(`TokenSampler`), so requests with different parameters share one decoding batch and a seeded request draws the same
tokens whatever else runs beside it. `StopStrings` cuts generated text at OpenAI-style stop strings; the engine works
on token ids, so the server applies them to the text it decodes.
"""

import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from transformers.generation.logits_process import (
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

__all__ = ["MAX_STOP_STRINGS", "OpenAIPenaltyLogitsProcessor", "SamplingParams", "StopStrings", "TokenSampler"]

MAX_STOP_STRINGS = 4  # OpenAI's limit


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How one request chooses its tokens (OpenAI's names and ranges; `top_k` as vLLM and transformers take it).

    Greedy decoding (`temperature` 0 or `None`) takes the most probable token after the penalties, and equals
    `model.generate(do_sample=False)` without them; `top_p`, `top_k` and `seed` then have no effect. Otherwise the
    logits go through transformers' `TemperatureLogitsWarper`, `TopKLogitsWarper` and `TopPLogitsWarper` (in
    `generate`'s order) and the token is drawn from the softmax.

    Args:
        temperature (`float`, *optional*): in [0, 2]; 0 or `None` (the default) decodes greedily. Note that OpenAI's
            default is 1: a request that names no temperature is greedy here.
        top_p (`float`, defaults to 1.0): in (0, 1]; nucleus sampling keeps the most probable tokens whose
            probabilities add up to `top_p` (1 keeps all).
        top_k (`int`, defaults to 0): at least 0; keeps the `top_k` most probable tokens (0 keeps all).
        presence_penalty (`float`, defaults to 0.0): in [-2, 2]; subtracted from the logit of every token generated at
            least once.
        frequency_penalty (`float`, defaults to 0.0): in [-2, 2]; subtracted from the logit of every token once per
            time it was generated.
        seed (`int`, *optional*): in [-2**63, 2**64); seeds the request's own generator, so the same request with the
            same seed draws the same tokens, alone or in any batch. Without it the generator is seeded from fresh
            entropy.

    Raises:
        `ValueError` naming the field, its value and its allowed range when a value is out of range or of the wrong
        type.
    """

    temperature: float | None = None
    top_p: float = 1.0
    top_k: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None

    def __post_init__(self):
        ranges = {
            "temperature": (0, 2, "[0, 2]"),
            "presence_penalty": (-2, 2, "[-2, 2]"),
            "frequency_penalty": (-2, 2, "[-2, 2]"),
        }
        for name, (low, high, text) in ranges.items():
            value = getattr(self, name)
            if value is None and name == "temperature":
                continue
            if not _is_number(value) or not low <= value <= high:  # NaN fails the comparison too
                raise ValueError(f"{name} ({value!r}) must be a number in {text}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p ({self.top_p!r}) must be a number in (0, 1]")
        if not _is_integer(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k ({self.top_k!r}) must be an integer of at least 0 (0 keeps every token)")
        if self.seed is not None and (not _is_integer(self.seed) or not -(2**63) <= self.seed < 2**64):
            raise ValueError(f"seed ({self.seed!r}) must be an integer in [-2**63, 2**64) or null")

    @classmethod
    def from_request(cls, body: Mapping[str, Any]) -> "SamplingParams":
        """The sampling fields of an OpenAI chat-completions request body; a field that is absent or `null` takes its
        default.

        Args:
            body (`Mapping[str, Any]`): the parsed JSON body.

        Returns:
            `SamplingParams`

        Raises:
            `ValueError` as the constructor does.
        """
        names = [item.name for item in fields(cls)]
        return cls(**{name: body[name] for name in names if body.get(name) is not None})

    @property
    def is_greedy(self) -> bool:
        """Whether the request takes the most probable token (temperature 0 or `None`)."""
        return not self.temperature

    @property
    def is_plain_greedy(self) -> bool:
        """Greedy without penalties: the argmax of the model's logits, which the engine takes for a whole batch."""
        return self.is_greedy and self.presence_penalty == 0 and self.frequency_penalty == 0

    def logits_processors(self) -> LogitsProcessorList:
        """The processors a request's logits go through before its token is chosen: the penalties, then (when
        sampling) temperature, top-k and top-p, each only when it changes something.

        Returns:
            `LogitsProcessorList`
        """
        processors = LogitsProcessorList()
        if self.presence_penalty or self.frequency_penalty:
            processors.append(OpenAIPenaltyLogitsProcessor(self.presence_penalty, self.frequency_penalty))
        if self.is_greedy:  # temperature, top-k and top-p never move the argmax
            return processors
        if self.temperature != 1:
            processors.append(TemperatureLogitsWarper(float(self.temperature)))
        if self.top_k:
            processors.append(TopKLogitsWarper(int(self.top_k)))
        if self.top_p < 1:
            processors.append(TopPLogitsWarper(float(self.top_p)))
        return processors


class OpenAIPenaltyLogitsProcessor(LogitsProcessor):
    """OpenAI's presence and frequency penalties: `logits[j] -= presence_penalty * (count[j] > 0) + frequency_penalty
    * count[j]`, where `count[j]` is how often token `j` occurs in `input_ids` (the tokens generated so far).

    transformers has only CTRL's multiplicative `RepetitionPenaltyLogitsProcessor`, which divides positive logits and
    multiplies negative ones and has no count term, so this additive form is written here.

    Args:
        presence_penalty (`float`): subtracted once from every token that occurs.
        frequency_penalty (`float`): subtracted once per occurrence.
    """

    def __init__(self, presence_penalty: float, frequency_penalty: float):
        self.presence_penalty = float(presence_penalty)
        self.frequency_penalty = float(frequency_penalty)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, num_generated)`): the tokens generated so far.
            scores (`torch.Tensor` of shape `(batch_size, vocab_size)`): the logits.

        Returns:
            `torch.Tensor` of shape `(batch_size, vocab_size)`: the penalized logits.
        """
        counts = torch.zeros_like(scores).scatter_add_(-1, input_ids, torch.ones_like(input_ids, dtype=scores.dtype))
        return scores - self.presence_penalty * (counts > 0).to(scores.dtype) - self.frequency_penalty * counts


class TokenSampler:
    """Chooses the next tokens of one request by its `SamplingParams`: its logits processors on its own logits row,
    then the argmax (greedy) or a draw from the softmax with the request's own generator, seeded once here.

    Args:
        params (`SamplingParams`): the request's parameters.
        device (`torch.device` or `str`, defaults to `"cpu"`): where the logits are (the generator lives there).
    """

    def __init__(self, params: SamplingParams, device: torch.device | str = "cpu"):
        self.params = params
        self.processors = params.logits_processors()
        self.generator: torch.Generator | None = None
        if not params.is_greedy:
            self.generator = torch.Generator(device=device)
            if params.seed is None:
                self.generator.seed()  # fresh entropy
            else:
                self.generator.manual_seed(params.seed)

    def __call__(self, generated: Sequence[int], logits: torch.Tensor) -> int:
        """The next token.

        Args:
            generated (`Sequence[int]`): the tokens the request has generated so far (what the penalties count).
            logits (`torch.Tensor` of shape `(vocab_size,)`): the request's logits row (suppressed tokens at -inf).

        Returns:
            `int`: the chosen token id.
        """
        input_ids = torch.tensor([list(generated)], dtype=torch.long, device=logits.device)
        scores = self.processors(input_ids, logits[None].float())
        if self.generator is None:
            return int(scores.argmax(dim=-1))
        probabilities = scores.softmax(dim=-1)
        return int(torch.multinomial(probabilities, num_samples=1, generator=self.generator))


class StopStrings:
    """Up to 4 stop strings, with OpenAI's semantics: the reply ends before the first place where one of them occurs,
    and the stop string is not returned.

    Args:
        stop (`str`, `Sequence[str]` or `None`): one string, a list of at most 4, or `None` (none).

    Raises:
        `ValueError` when `stop` is not a string or a list of at most 4 non-empty strings.
    """

    def __init__(self, stop: str | Sequence[str] | None = None):
        if stop is None:
            strings = ()
        elif isinstance(stop, str):
            strings = (stop,)
        elif isinstance(stop, list | tuple) and all(isinstance(string, str) for string in stop):
            strings = tuple(stop)
        else:
            raise ValueError(f"stop ({stop!r}) must be a string or a list of at most {MAX_STOP_STRINGS} strings")
        if len(strings) > MAX_STOP_STRINGS:
            raise ValueError(f"stop has {len(strings)} strings; at most {MAX_STOP_STRINGS} are allowed")
        if not all(strings):
            raise ValueError("stop strings must not be empty")
        self.strings = strings

    def __bool__(self) -> bool:
        return bool(self.strings)

    def cut(self, text: str) -> tuple[str, bool]:
        """Cuts `text` before the earliest stop string.

        Returns:
            `tuple[str, bool]`: the text before the earliest stop string (all of it when none occurs), and whether one
            occurs.
        """
        starts = [start for string in self.strings if (start := text.find(string)) >= 0]
        if not starts:
            return text, False
        return text[: min(starts)], True

    def streamable(self, text: str) -> str:
        """What of `text` (which holds no stop string) can be streamed now: all but its longest suffix that begins a
        stop string, since the next tokens may complete it.

        Returns:
            `str`: a prefix of `text`.
        """
        held = 0
        for string in self.strings:
            for length in range(min(len(string) - 1, len(text)), held, -1):
                if text.endswith(string[:length]):
                    held = length
                    break
        return text[: len(text) - held]
