"""Tests of deepseekv3.data.tones: every answer is checked against the waveform (tone detection and an FFT)."""

import hashlib
import json
import re

import numpy as np
import pytest

from deepseekv3.data import NUMBER_WORDS, QUESTION_TEMPLATES, build_tones_dataset
from deepseekv3.data.tones import sample_tones

_ORDINALS = ("first", "second", "third")
# Written out rather than read from the module under test.
_PITCH_HZ = {"low": 220.0, "mid": 440.0, "high": 880.0}
# Computed on the code before `num_tones` and `gap_fraction` existed (commit 8b7027e): default options must keep giving
# exactly that data (a digest of `sample_tones(30, seed=3)`) and that fingerprint.
_PRE_OPTIONS_ROWS_DIGEST = "25a6f6592d7b9f91"
_PRE_OPTIONS_TRAIN_FINGERPRINT = "85feed46a58f686f"


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


def test_default_options_give_the_data_of_earlier_versions():
    rows = sample_tones(30, seed=3)
    assert rows == sample_tones(30, seed=3, num_tones=None, gap_fraction=None, stream=1)
    # Another random stream draws other clips from the same seed (the edge cases have their own).
    assert [row["tones"] for row in sample_tones(30, seed=3, stream=3)] != [row["tones"] for row in rows]
    assert hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16] == _PRE_OPTIONS_ROWS_DIGEST
    for kwargs in ({}, {"num_tones": None, "gap_fraction": None}, {"gap_fraction": 0.08}):
        fingerprint = build_tones_dataset(20, clip_seconds=0.3, **kwargs)["train"]._fingerprint
        assert fingerprint == _PRE_OPTIONS_TRAIN_FINGERPRINT, kwargs
    fingerprints = {
        build_tones_dataset(20, clip_seconds=0.3, **kwargs)["train"]._fingerprint
        for kwargs in ({}, {"num_tones": 3}, {"gap_fraction": 0.0}, {"num_tones": 3, "gap_fraction": 0.0})
    }
    assert len(fingerprints) == 4


@pytest.mark.parametrize(("num_tones", "templates"), [(1, ["audio_pitch", "audio_count"]), (2, None), (3, None)])
def test_num_tones_sets_the_tones_of_every_clip(num_tones, templates):
    dataset = build_tones_dataset(
        24, seed=4, clip_seconds=0.5, templates=templates, num_tones=num_tones, split_sizes={"train": 1.0}
    ).with_format("numpy")["train"]
    for row in dataset:
        pitches = [pitch for _, _, pitch in _detect_tones(row["audio"]["array"], 16000)]
        assert len(row["tones"]) == len(pitches) == num_tones
        assert row["answer"] == _answer_from_waveform(row["question"], pitches), row["question"]
    if templates is None:
        assert set(dataset["question_template"]) == {"audio_pitch", "audio_count", "audio_order"}


@pytest.mark.parametrize("num_tones", [None, 3])
def test_gap_fraction_0_puts_the_tones_back_to_back(num_tones):
    sampling_rate, num_samples = 16000, 8000
    dataset = build_tones_dataset(
        24, seed=6, clip_seconds=0.5, num_tones=num_tones, gap_fraction=0.0, split_sizes={"train": 1.0}
    ).with_format("numpy")["train"]
    for row in dataset:
        waveform, tones = row["audio"]["array"], row["tones"]
        # Every onset is exactly one tone length (a fifth of the clip) after the one before.
        assert all(tone["end"] - tone["start"] == num_samples // 5 for tone in tones)
        assert all(later["start"] == earlier["end"] for earlier, later in zip(tones, tones[1:]))
        # The fades reach 0 only at the boundaries: the clip is never silent for 5 ms from the first onset to the
        # last tone's end, so it reads as one run of sound.
        ((start, end, _),) = _detect_tones(waveform, sampling_rate)
        assert (start, end) == (tones[0]["start"] + 1, tones[-1]["end"] - 1)
        assert not waveform[: tones[0]["start"]].any() and not waveform[tones[-1]["end"] :].any()
        # Each tone's stretch holds its own pitch, and the answer is the one those pitches give.
        pitches = []
        for tone in tones:
            ((_, _, pitch),) = _detect_tones(waveform[tone["start"] : tone["end"]], sampling_rate)
            pitches.append(pitch)
        assert pitches == [tone["pitch"] for tone in tones]
        assert row["answer"] == _answer_from_waveform(row["question"], pitches), row["question"]
    if num_tones is not None:
        assert all(len(tones) == num_tones for tones in dataset["tones"])


def test_gap_fraction_sets_the_silence_between_tones():
    rows = sample_tones(30, seed=2, clip_seconds=0.5, num_tones=3, gap_fraction=0.04)
    gaps = {later["start"] - earlier["end"] for row in rows for earlier, later in zip(row["tones"], row["tones"][1:])}
    assert gaps == {round(0.04 * 8000)}
    default = sample_tones(30, seed=2, clip_seconds=0.5, num_tones=3)
    gaps = {
        later["start"] - earlier["end"] for row in default for earlier, later in zip(row["tones"], row["tones"][1:])
    }
    assert gaps == {round(0.08 * 8000)}


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
        ({"num_tones": 0}, r"num_tones \(0\) must be between 1 and 3"),
        ({"num_tones": 4}, r"num_tones \(4\) must be between 1 and 3"),
        ({"num_tones": 1}, r"template 'audio_order' needs at least 2 tones, but num_tones is 1"),
        ({"gap_fraction": -0.01}, r"gap_fraction \(-0.01\) must be between 0 \(tones back to back\) and 0.08"),
        ({"gap_fraction": 0.1}, r"gap_fraction \(0.1\) must be between 0"),
        ({"gap_fraction": float("nan")}, r"gap_fraction \(nan\) must be between 0"),
    ],
)
def test_bad_arguments_raise_a_value_error_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_tones_dataset(10, **kwargs)
