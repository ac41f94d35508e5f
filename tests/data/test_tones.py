"""Tests of deepseekv3.data.tones: every answer is checked against the waveform (tone detection and an FFT)."""

import re

import numpy as np
import pytest

from deepseekv3.data import NUMBER_WORDS, QUESTION_TEMPLATES, build_tones_dataset

_ORDINALS = ("first", "second", "third")
# Written out rather than read from the module under test.
_PITCH_HZ = {"low": 220.0, "mid": 440.0, "high": 880.0}


@pytest.fixture(scope="module")
def tones():
    return build_tones_dataset(45, seed=5, split_sizes={"train": 1.0}).with_format("numpy")["train"]


def _detect_tones(waveform: np.ndarray, sampling_rate: int) -> list[tuple[int, int, str]]:
    """`(start, end, pitch)` of each run of sound, the pitch the one nearest to the run's FFT peak."""
    loud = np.abs(waveform) > 1e-6
    # A run ends where the signal stays silent for 5 ms (a sine crosses zero far more briefly than that).
    loud_at = np.flatnonzero(loud)
    breaks = np.flatnonzero(np.diff(loud_at) > 0.005 * sampling_rate)
    starts = np.concatenate([loud_at[:1], loud_at[breaks + 1]])
    ends = np.concatenate([loud_at[breaks], loud_at[-1:]]) + 1
    detected = []
    for start, end in zip(starts, ends):
        spectrum = np.abs(np.fft.rfft(waveform[start:end]))
        peak = np.fft.rfftfreq(end - start, 1 / sampling_rate)[spectrum.argmax()]
        resolution = sampling_rate / (end - start)
        pitch = min(_PITCH_HZ, key=lambda name: abs(_PITCH_HZ[name] - peak))
        assert abs(_PITCH_HZ[pitch] - peak) <= resolution, (peak, pitch)
        detected.append((int(start), int(end), pitch))
    return detected


def _answer_from_waveform(question: str, pitches: list[str]) -> str:
    if question == "how many tones are there?":
        return NUMBER_WORDS[len(pitches) - 1]
    if match := re.fullmatch(r"what is the pitch of the (\w+) tone\?", question):
        return pitches[_ORDINALS.index(match[1])]
    match = re.fullmatch(r"how does the (\w+) tone compare to the (\w+)\?", question)
    later, earlier = (("low", "mid", "high").index(pitches[_ORDINALS.index(match[group])]) for group in (1, 2))
    return "higher" if later > earlier else "lower" if later < earlier else "same"


def test_clips_have_the_set_length_and_stay_finite_and_bounded(tones):
    for row in tones:
        waveform = row["audio"]["array"]
        assert waveform.dtype == np.float32 and waveform.shape == (16000,)
        assert row["audio"]["sampling_rate"] == 16000
        assert np.isfinite(waveform).all() and np.abs(waveform).max() <= 0.5


def test_answers_and_tones_match_what_the_waveform_holds(tones):
    for row in tones:
        detected = _detect_tones(row["audio"]["array"], 16000)
        pitches = [pitch for _, _, pitch in detected]
        assert [tone["pitch"] for tone in row["tones"]] == pitches
        # The fades start and end at exactly 0, so the first and last sample of each tone are silent.
        for tone, (start, end, _) in zip(row["tones"], detected):
            assert (start, end) == (tone["start"] + 1, tone["end"] - 1)
        assert row["caption"] == " then ".join(f"a {pitch} tone" for pitch in pitches)
        assert row["answer"] == _answer_from_waveform(row["question"], pitches), row["question"]
        assert row["answer"] in QUESTION_TEMPLATES[row["question_template"]].answers
        assert row["question_type"] == "audio" and not row["held_out"]


def test_referred_objects_are_the_tones_the_question_names(tones):
    for row in tones:
        referred = row["referred_objects"].tolist()
        if row["question_template"] == "audio_count":
            assert referred == list(range(len(row["tones"])))
        else:
            assert [_ORDINALS[index] in row["question"] for index in referred] == [True] * len(referred)


def test_same_seed_gives_identical_clips_and_another_seed_differs():
    first, second, other = (build_tones_dataset(12, seed=seed, clip_seconds=0.5) for seed in (9, 9, 10))
    for split in first:
        assert first[split].data.equals(second[split].data)
    assert first["train"]["tones"] != other["train"]["tones"]


def test_clip_seconds_and_sampling_rate_set_the_length():
    row = build_tones_dataset(3, clip_seconds=0.3, sampling_rate=8000, split_sizes={"train": 1.0})["train"][0]
    assert len(row["audio"]["array"]) == 2400 and row["audio"]["sampling_rate"] == 8000
    assert all(tone["end"] <= 2400 for tone in row["tones"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"clip_seconds": 2.0}, "clip_seconds"),
        ({"sampling_rate": 2000}, "sampling_rate"),
        ({"templates": ["color"]}, "templates"),
    ],
)
def test_bad_arguments_raise_a_value_error_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_tones_dataset(10, **kwargs)
