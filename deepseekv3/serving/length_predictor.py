"""Output-length predictor: a small LSTM that reads a prompt's tokens and predicts how many tokens the model will
generate for it, trained from the engine's own logs of (prompt tokens -> generated length). The engine logs prompt
tokens only when told to (`EngineConfig.log_prompt_tokens`), keeps them in memory, and never writes them to disk.

The scheduler uses the prediction to group requests of similar total length and to admit them by predicted memory.
Untrained, it falls back to each request's `max_new_tokens` (the worst case), which is what the engine assumes
without a predictor.

A request that reached its `max_new_tokens` was cut off: its length is only known to be at least that (a
right-censored length, `LengthRecord.is_censored`). `fit` treats such a record as censored by default: its loss is
zero for any prediction at or above the cap and the L1 distance below it. With one cap for every request, that
loss is minimised by the smaller of the median length and the cap, where counting the cut-off lengths as exact
pulls the estimate down to the cap as soon as half the answers are cut off. With caps that differ by request, the
answers that finished under a low cap still pull the estimate down somewhat (less than counting the caps as exact
does).
"""

import json
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_sequence

__all__ = ["LengthPredictor", "LengthPredictorConfig", "LengthRecord"]

_CONFIG_NAME = "length_predictor.json"
_WEIGHTS_NAME = "length_predictor.pt"


@dataclass
class LengthRecord:
    """One finished request from the engine's log.

    Args:
        prompt_length (`int`), generated_length (`int`), max_new_tokens (`int`): the request's lengths.
        prompt_ids (`tuple[int]`, defaults to `()`): the prompt's last tokens, the features `fit` trains on (the
            engine keeps `EngineConfig.log_prompt_tokens` of them, in memory only); empty in a log of lengths only.
    """

    prompt_length: int
    generated_length: int
    max_new_tokens: int
    prompt_ids: tuple[int, ...] = ()

    @property
    def is_censored(self) -> bool:
        """Whether the request reached its `max_new_tokens`, so its own length is only known to be at least that (one
        that stopped exactly at the cap is counted too: the log cannot tell the two apart, and "at least" holds)."""
        return self.generated_length >= self.max_new_tokens


@dataclass
class LengthPredictorConfig:
    """Sizes of the predictor.

    Args:
        vocab_size (`int`): the model's vocabulary size.
        embedding_size (`int`, defaults to 32), hidden_size (`int`, defaults to 64): LSTM sizes.
        max_prompt_tokens (`int`, defaults to 128): only the last this-many prompt tokens are read.
    """

    vocab_size: int
    embedding_size: int = 32
    hidden_size: int = 64
    max_prompt_tokens: int = 128


class LengthPredictor(nn.Module):
    """Embedding -> one-layer LSTM -> linear head on the last state, predicting `log(1 + generated_length)`.

    Args:
        config (`LengthPredictorConfig`): sizes.
    """

    def __init__(self, config: LengthPredictorConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.embedding_size)
        self.lstm = nn.LSTM(config.embedding_size, config.hidden_size, batch_first=True)
        self.head = nn.Linear(config.hidden_size, 1)
        self.is_trained = False

    def forward(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Predicted `log(1 + generated_length)` of each prompt, shape `(len(prompts),)`."""
        rows = [torch.tensor(list(prompt)[-self.config.max_prompt_tokens :] or [0]) for prompt in prompts]
        lengths = torch.tensor([len(row) for row in rows])
        for row in rows:
            if int(row.max()) >= self.config.vocab_size or int(row.min()) < 0:
                raise ValueError(f"prompt token ids must lie in [0, {self.config.vocab_size}), got {row.tolist()}")
        embedded = self.embedding(pad_sequence(rows, batch_first=True))
        packed = pack_padded_sequence(embedded, lengths, batch_first=True, enforce_sorted=False)
        _, (hidden, _) = self.lstm(packed)
        return self.head(hidden[-1]).squeeze(-1)

    @torch.no_grad()
    def predict(self, prompts: Sequence[Sequence[int]], max_new_tokens: Sequence[int]) -> list[float]:
        """Predicted generated length of each prompt, within `[1, max_new_tokens]`; `max_new_tokens` itself while
        untrained."""
        if not self.is_trained:
            return [float(limit) for limit in max_new_tokens]
        was_training = self.training
        self.eval()
        predicted = torch.expm1(self(prompts)).tolist()
        self.train(was_training)
        return [min(max(value, 1.0), float(limit)) for value, limit in zip(predicted, max_new_tokens)]

    def fit(
        self,
        records: Sequence[LengthRecord],
        epochs: int = 30,
        batch_size: int = 32,
        lr: float = 1e-2,
        seed: int = 0,
        censoring: bool = True,
    ) -> list[float]:
        """Trains on logged requests (L1 loss on `log(1 + length)`); returns the mean loss of each epoch.

        With `censoring` (the default), a record that reached its `max_new_tokens` (`is_censored`) only says "at
        least this long": its loss is `max(0, log(1 + length) - predicted)` (see the module docstring). Without it,
        every logged length counts as exact.
        """
        if not records:
            raise ValueError("fit needs at least one logged request")
        _check_features(records)
        generator = random.Random(seed)
        optimizer = torch.optim.Adam(self.parameters(), lr=lr)
        targets = torch.tensor([math.log1p(record.generated_length) for record in records])
        censored = torch.tensor([censoring and record.is_censored for record in records])
        order = list(range(len(records)))
        history = []
        self.train()
        for _ in range(epochs):
            generator.shuffle(order)
            losses = []
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                predicted = self([records[index].prompt_ids for index in batch])
                shortfall = targets[batch] - predicted
                loss = torch.where(censored[batch], shortfall.clamp(min=0), shortfall.abs()).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
            history.append(sum(losses) / len(losses))
        self.eval()
        self.is_trained = True
        return history

    def mean_absolute_error(self, records: Sequence[LengthRecord]) -> float:
        """MAE, in tokens, of `predict` on `records` (held-out logs)."""
        _check_features(records)
        predicted = self.predict([r.prompt_ids for r in records], [r.max_new_tokens for r in records])
        return sum(abs(p - r.generated_length) for p, r in zip(predicted, records)) / len(records)

    def save(self, directory: str | Path) -> None:
        """Writes `length_predictor.json` (sizes, trained flag) and `length_predictor.pt` (weights) to `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / _CONFIG_NAME).write_text(json.dumps({**asdict(self.config), "is_trained": self.is_trained}))
        torch.save(self.state_dict(), directory / _WEIGHTS_NAME)

    @classmethod
    def load(cls, directory: str | Path) -> "LengthPredictor":
        """Loads what `save` wrote."""
        directory = Path(directory)
        if not (directory / _CONFIG_NAME).is_file():
            raise FileNotFoundError(f"no {_CONFIG_NAME} in {directory}")
        settings = json.loads((directory / _CONFIG_NAME).read_text())
        is_trained = settings.pop("is_trained")
        predictor = cls(LengthPredictorConfig(**settings))
        predictor.load_state_dict(torch.load(directory / _WEIGHTS_NAME, weights_only=True))
        predictor.is_trained = is_trained
        return predictor.eval()


def _check_features(records: Sequence[LengthRecord]) -> None:
    missing = sum(1 for record in records if not record.prompt_ids)
    if missing:
        raise ValueError(
            f"{missing} of {len(records)} records hold no prompt tokens: log them with "
            "EngineConfig(log_prompt_tokens=...) to train or evaluate the predictor"
        )
