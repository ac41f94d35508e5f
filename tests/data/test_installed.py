"""The real-data builders: letters from installed fonts and words from espeak-ng, deterministic, with the test split's
fonts and voices never in training, and labels the pictures and sounds bear out.

They need Debian's font and espeak-ng packages (`.ci/run` installs them). Without them the tests are skipped, unless
`DEEPSEEKV3_REQUIRE_SYSTEM_DATA=1` (set by `.ci/run`) makes the missing packages a failure.
"""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from deepseekv3.data.installed import (
    FONT_DIRECTORIES,
    build_letters_dataset,
    build_spoken_words_dataset,
    espeak_variants,
    installed_fonts,
    speak,
    split_names,
)

_REQUIRED = os.environ.get("DEEPSEEKV3_REQUIRE_SYSTEM_DATA") == "1"
_HAVE_FONTS = any(Path(directory).glob("*.ttf") for directory in FONT_DIRECTORIES)
_HAVE_ESPEAK = shutil.which("espeak-ng") is not None


def _need(available: bool, what: str) -> None:
    if available:
        return
    message = (
        f"{what} is not installed (apt-get install fonts-dejavu-core fonts-dejavu-extra fonts-liberation2 espeak-ng)"
    )
    if _REQUIRED:
        pytest.fail(message)
    pytest.skip(message)


def test_split_names_is_a_seeded_partition():
    names = [f"n{i}" for i in range(20)]
    splits = split_names(names, {"train": 0.7, "validation": 0.15, "test": 0.15}, seed=3)
    assert [len(group) for group in splits.values()] == [14, 3, 3]
    assert sorted(sum(splits.values(), [])) == sorted(names)
    assert splits == split_names(list(reversed(names)), {"train": 0.7, "validation": 0.15, "test": 0.15}, seed=3)
    assert splits != split_names(names, {"train": 0.7, "validation": 0.15, "test": 0.15}, seed=4)
    assert [len(group) for group in split_names(names[:3], {"a": 0.98, "b": 0.01, "c": 0.01}, 0).values()] == [1, 1, 1]
    with pytest.raises(ValueError, match="2 names cannot fill the 3 splits"):
        split_names(names[:2], {"a": 1, "b": 1, "c": 1}, 0)


def test_letters_are_deterministic_with_unseen_test_fonts_and_readable_labels():
    _need(_HAVE_FONTS, "the DejaVu / Liberation fonts")
    fonts = installed_fonts()[:9]
    sizes = {"train": 0.6, "validation": 0.2, "test": 0.2}
    letters = build_letters_dataset(3, fonts=fonts, letters="OIXL", split_sizes=sizes, seed=1)
    again = build_letters_dataset(3, fonts=fonts, letters="OIXL", split_sizes=sizes, seed=1)
    for split in letters:
        assert letters[split]["answer"] == again[split]["answer"] and letters[split]["font"] == again[split]["font"]
        first = [np.asarray(image) for image in letters[split]["image"]]
        assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(first, again[split]["image"]))
    train_fonts, test_fonts = set(letters["train"]["font"]), set(letters["test"]["font"])
    assert not train_fonts & test_fonts and len(train_fonts | test_fonts | set(letters["validation"]["font"])) == 9
    assert len(letters["train"]) == len(train_fonts) * 4 * 3
    assert letters["test"][0]["question"] == "Which letter is this?" and letters["test"][0]["image"].size == (32, 32)

    # the pictures bear their labels out: nearest neighbour from the training fonts reads the unseen fonts' letters
    def pixels(split):
        return np.stack(
            [np.asarray(image.convert("L"), dtype=np.float32).ravel() for image in letters[split]["image"]]
        )

    train, test = pixels("train"), pixels("test")
    train -= train.mean(axis=1, keepdims=True)
    test -= test.mean(axis=1, keepdims=True)
    nearest = np.argmax(test @ train.T / np.linalg.norm(train, axis=1), axis=1)
    predicted = [letters["train"]["answer"][index] for index in nearest]
    accuracy = np.mean([p == a for p, a in zip(predicted, letters["test"]["answer"])])
    assert accuracy > 0.5  # chance is 0.25


def test_spoken_words_are_deterministic_with_unseen_test_voices():
    _need(_HAVE_ESPEAK, "espeak-ng")
    variants = espeak_variants()
    assert {"f1", "m1", "klatt"} <= set(variants) and len(variants) > 50
    # every listed variant is one espeak-ng knows: an unknown one would silently speak in the accent's default voice
    default, _ = speak("seven", "en", 170, 50)
    spoken = [speak("seven", f"en+{variant}", 170, 50)[0] for variant in variants]
    assert not any(len(clip) == len(default) and np.array_equal(clip, default) for clip in spoken)
    kwargs = {"variants": ["f1", "m1", "m3", "klatt"], "accents": ["en", "en-us"], "words": ["one", "seven"]}
    kwargs.update(split_sizes={"train": 0.5, "validation": 0.25, "test": 0.25}, seed=2, progress=False)
    words, again = build_spoken_words_dataset(**kwargs), build_spoken_words_dataset(**kwargs)
    for split in words:
        assert words[split]["voice"] == again[split]["voice"] and words[split]["answer"] == again[split]["answer"]
        for clip, same in zip(words[split]["audio"], again[split]["audio"]):
            assert clip["sampling_rate"] == 22050 and np.array_equal(clip["array"], same["array"])
            # trimmed of silence at both ends, at most 1 s
            assert 0.1 * 22050 < len(clip["array"]) <= 22050 and abs(clip["array"][0]) > 0.02
    variant = {split: {voice.split("+")[1] for voice in words[split]["voice"]} for split in words}
    assert not variant["train"] & variant["test"] and len(variant["train"]) == 2
    assert len(words["train"]) == 2 * 2 * 2  # variants x accents x words
    # each clip is its row's word in its row's voice, speed and pitch
    for row in words["test"]:
        array, rate = speak(row["answer"], row["voice"], row["speed"], row["pitch"])
        assert rate == 22050 and np.array_equal(np.asarray(row["audio"]["array"], dtype=np.float32), array)
