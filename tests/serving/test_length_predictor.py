"""Output-length predictor: falls back to max_new_tokens untrained, learns a length signal from logs, treats lengths
cut off at max_new_tokens as censored, round-trips."""

import random

import pytest
import torch

from deepseekv3.serving import LengthPredictor, LengthPredictorConfig, LengthRecord

VOCAB = 64
HINTS = {10: 2, 11: 8, 12: 20, 13: 40}  # a "length hint" token (like "briefly" / "in detail") -> answer length


def synthetic_logs(count: int, seed: int) -> list[LengthRecord]:
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        hint = rng.choice(sorted(HINTS))
        prompt = [1] + [rng.randint(20, VOCAB - 1) for _ in range(rng.randint(2, 12))]
        prompt.insert(rng.randint(1, len(prompt)), hint)
        length = max(1, HINTS[hint] + rng.randint(-1, 1))
        records.append(LengthRecord(len(prompt), length, 48, tuple(prompt)))
    return records


def test_untrained_predictor_falls_back_to_max_new_tokens():
    predictor = LengthPredictor(LengthPredictorConfig(vocab_size=VOCAB))
    assert not predictor.is_trained
    assert predictor.predict([[1, 2, 3], [1]], [7, 30]) == [7.0, 30.0]


def test_predictor_learns_lengths_from_logs_and_beats_the_mean():
    train, held_out = synthetic_logs(300, seed=0), synthetic_logs(100, seed=1)
    predictor = LengthPredictor(LengthPredictorConfig(vocab_size=VOCAB))
    history = predictor.fit(train, epochs=12)
    assert history[-1] < history[0] / 3
    mae = predictor.mean_absolute_error(held_out)
    mean_length = sum(r.generated_length for r in train) / len(train)
    mean_mae = sum(abs(mean_length - r.generated_length) for r in held_out) / len(held_out)
    assert mae < 0.25 * mean_mae, (mae, mean_mae)
    # predictions stay within [1, max_new_tokens]
    assert predictor.predict([[1, 13, 30]], [5]) == [5.0]


def test_save_load_round_trip(tmp_path):
    predictor = LengthPredictor(LengthPredictorConfig(vocab_size=VOCAB, hidden_size=16))
    predictor.fit(synthetic_logs(40, seed=2), epochs=2)
    predictor.save(tmp_path)
    loaded = LengthPredictor.load(tmp_path)
    prompts = [[1, 10, 30], [1, 12, 40, 41]]
    assert loaded.is_trained and loaded.config == predictor.config
    assert loaded.predict(prompts, [48, 48]) == predictor.predict(prompts, [48, 48])
    with pytest.raises(FileNotFoundError, match="length_predictor.json"):
        LengthPredictor.load(tmp_path / "missing")


def test_bad_inputs_raise():
    predictor = LengthPredictor(LengthPredictorConfig(vocab_size=VOCAB))
    with pytest.raises(ValueError, match="at least one"):
        predictor.fit([])
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        predictor([[1, 64]])


def capped_logs(count: int, seed: int, cut_off: float) -> list[LengthRecord]:
    """Hint 12 answers run 19-21 tokens; a `cut_off` share of them are cut off at `max_new_tokens` = 8 (censored)."""
    rng = random.Random(seed)
    records = []
    for record in synthetic_logs(count, seed):
        if 19 <= record.generated_length <= 21 and rng.random() < cut_off:
            record = LengthRecord(record.prompt_length, 8, 8, record.prompt_ids)
        records.append(record)
    return records


def test_a_length_that_reached_max_new_tokens_is_censored():
    assert LengthRecord(10, 8, 8).is_censored
    assert not LengthRecord(10, 7, 8).is_censored


def test_censored_lengths_count_as_at_least_the_cap():
    """With three quarters of the 20-token answers cut off at 8 tokens, counting the cut-off lengths as exact predicts
    far fewer than 20 tokens for them; treating them as censored still predicts their real length for a request
    allowed 48 tokens."""
    train = capped_logs(300, seed=0, cut_off=0.75)
    assert sum(record.is_censored for record in train) > 40
    held_out = synthetic_logs(80, seed=1)
    long_prompts = [list(record.prompt_ids) for record in held_out if 19 <= record.generated_length <= 21]
    predictions = {}
    for censoring in (True, False):
        torch.manual_seed(0)
        predictor = LengthPredictor(LengthPredictorConfig(vocab_size=VOCAB))
        predictor.fit(train, epochs=12, censoring=censoring)
        predicted = predictor.predict(long_prompts, [48] * len(long_prompts))
        predictions[censoring] = sorted(predicted)[len(predicted) // 2]
    assert 16 < predictions[True] < 25, predictions
    assert predictions[False] < 14, predictions
