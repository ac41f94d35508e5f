"""Output-length predictor: falls back to max_new_tokens untrained, learns a length signal from logs, round-trips."""

import random

import pytest

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
