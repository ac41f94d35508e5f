"""Synthetic audio clips of tone sequences with captions and questions about pitch, count and order.

Each clip holds one to three sine tones, each low (220 Hz), mid (440 Hz) or high (880 Hz), with raised-cosine fades
and short gaps, at a random offset inside a fixed-length mono float32 clip (1 s at 16 kHz by default). Every clip has
the same length, so a clip's duration says nothing about its number of tones. The `audio` column is a plain struct
`{"array": list[float32], "sampling_rate": int32}`: `datasets.Audio` would need torchcodec and FFmpeg to encode
arrays, and the processor takes the arrays as they are.

Two options shape the clips for edge cases (`build_edge_cases`): `num_tones` fixes the number of tones of every clip,
and `gap_fraction` shortens the silence between tones, down to none (`0`: tones back to back). With both at their
defaults the data is exactly that of earlier versions (same rows, same fingerprints).
"""

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np
from datasets import DatasetDict, Features, List, Value

from .questions import (
    COMMON_FEATURES,
    DEFAULT_HELD_OUT_TEMPLATES,
    NUMBER_WORDS,
    ORDER_WORDS,
    PITCHES,
    QUESTION_TEMPLATES,
    build_messages,
    resolve_templates,
)
from .splits import build_dataset_dict, rows_to_table, sample_unique, split_rows

__all__ = ["PITCH_FREQUENCIES", "TONES_FEATURES", "build_tones_dataset", "sample_tones", "synthesize_tones"]

PITCH_FREQUENCIES = {"low": 220.0, "mid": 440.0, "high": 880.0}
_ORDINALS = ("first", "second", "third")
# Fractions of the clip: three tones and two gaps fill 76% of it, the rest is silence around them.
_TONE_FRACTION = 0.2
_GAP_FRACTION = 0.08
_FADE_SECONDS = 0.01
_MIN_CLIP_SECONDS, _MAX_CLIP_SECONDS = 0.25, 1.5
_TONES_STREAM = 1

TONES_FEATURES = Features(
    {
        "audio": {"array": List(Value("float32")), "sampling_rate": Value("int32")},
        "tones": List({"pitch": Value("string"), "start": Value("int32"), "end": Value("int32")}),
        **COMMON_FEATURES,
    }
)


def build_tones_dataset(
    num_examples: int,
    seed: int = 0,
    sampling_rate: int = 16000,
    clip_seconds: float = 1.0,
    split_sizes: Mapping[str, float] | None = None,
    templates: Sequence[str] | None = None,
    held_out_templates: Collection[str] = DEFAULT_HELD_OUT_TEMPLATES,
    *,
    num_tones: int | None = None,
    gap_fraction: float | None = None,
) -> DatasetDict:
    """The tones data set: one clip, caption and question per row, split into train/validation/test.

    Args:
        num_examples (`int`): clips over all splits; every clip differs from every other.
        seed (`int`, defaults to 0): the same seed gives identical data.
        sampling_rate (`int`, defaults to 16000): samples per second (the Whisper feature extractor's rate).
        clip_seconds (`float`, defaults to 1.0): length of every clip, between 0.25 and 1.5 s. Each tone lasts a
            fifth of it.
        split_sizes (`Mapping[str, float]`, *optional*): fraction of examples per split, summing to 1; defaults to
            `{"train": 0.8, "validation": 0.1, "test": 0.1}`. Rows are assigned to splits in order.
        templates (`Sequence[str]`, *optional*): names of the audio templates to ask (`audio_pitch`, `audio_count`,
            `audio_order`); all of them by default.
        held_out_templates (`Collection[str]`, defaults to `("color_by_side",)`): templates whose rows get
            `held_out=True`; names of image templates are ignored here.
        num_tones (`int`, *optional*): tones in every clip, 1 to 3; by default each clip draws between the fewest
            its template needs (`QUESTION_TEMPLATES[name].min_items`) and 3.
        gap_fraction (`float`, *optional*): the silence between consecutive tones as a fraction of the clip, between
            0 (tones back to back) and 0.08; defaults to 0.08.

    Returns:
        `DatasetDict` with `TONES_FEATURES`: `audio` (`{"array", "sampling_rate"}`), `tones` (`pitch`, and `start`,
        `end` in samples, end exclusive), `caption`, `question`, `answer`, `question_type` (`"audio"`),
        `question_template` (the finer audio type), `referred_objects` (tone indices: the tone the answer is about,
        then the tone it is compared with, or every tone for `audio_count`), `held_out`, `messages` and `modality`
        (`"audio"`).

    Raises:
        `ValueError`: a clip length or sampling rate out of range, unknown templates, `num_tones` outside 1-3 or
            below a template's `min_items`, a `gap_fraction` outside [0, 0.08], or split sizes that do not sum to 1.
    """
    rows = sample_tones(
        num_examples,
        seed,
        sampling_rate,
        clip_seconds,
        templates,
        held_out_templates,
        num_tones=num_tones,
        gap_fraction=gap_fraction,
    )
    num_samples = round(clip_seconds * sampling_rate)
    for row in rows:
        row["audio"] = {
            "array": synthesize_tones(row["tones"], num_samples, sampling_rate),
            "sampling_rate": sampling_rate,
        }
    # Options are appended only where they change the data, so default data keeps the fingerprints it had before.
    options = {"num_tones": num_tones} if num_tones is not None else {}
    options.update({"gap_fraction": gap_fraction} if gap_fraction not in (None, _GAP_FRACTION) else {})
    generation = ("tones", num_examples, seed, sampling_rate, clip_seconds, split_sizes, templates)
    generation = repr(generation + (sorted(held_out_templates),) + ((options,) if options else ()))
    tables = {name: rows_to_table(split, TONES_FEATURES) for name, split in split_rows(rows, split_sizes).items()}
    return build_dataset_dict(tables, TONES_FEATURES, generation)


def sample_tones(
    num_examples: int,
    seed: int = 0,
    sampling_rate: int = 16000,
    clip_seconds: float = 1.0,
    templates: Sequence[str] | None = None,
    held_out_templates: Collection[str] = DEFAULT_HELD_OUT_TEMPLATES,
    *,
    num_tones: int | None = None,
    gap_fraction: float | None = None,
    stream: int = _TONES_STREAM,
) -> list[dict[str, Any]]:
    """The rows of `build_tones_dataset` without the waveforms: tone layouts, captions, questions, answers.

    Arguments as in `build_tones_dataset`, and:
        stream (`int`, *optional*, defaults to 1): the random stream under `seed` (`sample_unique`); another stream
            draws other clips from the same seed (the edge cases use their own, apart from the core data's).

    Returns one dict per example, in order.
    """
    if not _MIN_CLIP_SECONDS <= clip_seconds <= _MAX_CLIP_SECONDS:
        raise ValueError(f"clip_seconds ({clip_seconds}) must be between {_MIN_CLIP_SECONDS} and {_MAX_CLIP_SECONDS}")
    if sampling_rate < 4 * max(PITCH_FREQUENCIES.values()):
        raise ValueError(f"sampling_rate ({sampling_rate}) must be at least 4x the highest pitch (880 Hz)")
    if gap_fraction is not None and not 0.0 <= gap_fraction <= _GAP_FRACTION:
        raise ValueError(
            f"gap_fraction ({gap_fraction}) must be between 0 (tones back to back) and {_GAP_FRACTION} (the default)"
        )
    templates, held_out = resolve_templates("audio", templates, held_out_templates)
    _check_num_tones(num_tones, templates)
    num_samples = round(clip_seconds * sampling_rate)
    tone_samples = round(_TONE_FRACTION * num_samples)
    gap_samples = round((_GAP_FRACTION if gap_fraction is None else gap_fraction) * num_samples)

    def sample(rng: np.random.Generator, index: int) -> dict[str, Any]:
        template = templates[index % len(templates)]
        count = num_tones
        if count is None:
            count = int(rng.integers(QUESTION_TEMPLATES[template].min_items, len(NUMBER_WORDS) + 1))
        pitches = [str(pitch) for pitch in rng.choice(PITCHES, size=count)]
        used = count * tone_samples + (count - 1) * gap_samples
        offset = int(rng.integers(0, num_samples - used + 1))
        tones = [
            {"pitch": pitch, "start": start, "end": start + tone_samples}
            for pitch, start in zip(pitches, range(offset, num_samples, tone_samples + gap_samples))
        ]
        question, answer, referred = _ask(rng, template, pitches)
        return {
            "modality": "audio",
            "tones": tones,
            "caption": " then ".join(f"a {pitch} tone" for pitch in pitches),
            "question": question,
            "answer": answer,
            "question_type": QUESTION_TEMPLATES[template].question_type,
            "question_template": template,
            "referred_objects": referred,
            "held_out": template in held_out,
            "messages": build_messages(question, answer, "audio"),
        }

    def key(row: dict[str, Any]) -> tuple:
        return tuple((tone["pitch"], tone["start"]) for tone in row["tones"])

    return sample_unique(num_examples, seed, stream, sample, key)


def synthesize_tones(tones: Sequence[Mapping[str, Any]], num_samples: int, sampling_rate: int) -> np.ndarray:
    """Render `tones` (`pitch`, `start`, `end` in samples) as sine waves with raised-cosine fades, amplitude 0.5.

    Args:
        tones (`Sequence[Mapping]`): as in the `tones` column.
        num_samples (`int`): length of the clip.
        sampling_rate (`int`): samples per second.

    Returns:
        `np.ndarray` of shape `(num_samples,)`, float32, silent outside the tones.
    """
    waveform = np.zeros(num_samples, dtype=np.float64)
    fade_samples = round(_FADE_SECONDS * sampling_rate)
    for tone in tones:
        start, end = tone["start"], tone["end"]
        time = np.arange(end - start) / sampling_rate
        envelope = np.ones(end - start)
        # Fades keep the tone's edges from clicking (a click spreads energy over every frequency).
        ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(fade_samples) / fade_samples)
        envelope[:fade_samples] = ramp
        envelope[-fade_samples:] = ramp[::-1]
        waveform[start:end] = 0.5 * envelope * np.sin(2 * np.pi * PITCH_FREQUENCIES[tone["pitch"]] * time)
    return waveform.astype(np.float32)


def _check_num_tones(num_tones: int | None, templates: Sequence[str]) -> None:
    """Raise if `num_tones` is set outside 1-3 or below what one of `templates` needs."""
    if num_tones is None:
        return
    if not 1 <= num_tones <= len(NUMBER_WORDS):
        raise ValueError(f"num_tones ({num_tones}) must be between 1 and {len(NUMBER_WORDS)}, or None")
    for template in templates:
        if QUESTION_TEMPLATES[template].min_items > num_tones:
            raise ValueError(
                f"template {template!r} needs at least {QUESTION_TEMPLATES[template].min_items} tones, but "
                f"num_tones is {num_tones}; ask for more tones or leave {template!r} out of templates"
            )


def _ask(rng: np.random.Generator, template: str, pitches: list[str]) -> tuple[str, str, list[int]]:
    """Question, answer and referred tone indices of `template` about the tone sequence."""
    if template == "audio_count":
        return "how many tones are there?", NUMBER_WORDS[len(pitches) - 1], list(range(len(pitches)))
    if template == "audio_pitch":
        index = int(rng.integers(len(pitches)))
        return f"what is the pitch of the {_ORDINALS[index]} tone?", pitches[index], [index]
    index = int(rng.integers(1, len(pitches)))
    step = PITCHES.index(pitches[index]) - PITCHES.index(pitches[index - 1])
    answer = ORDER_WORDS[0] if step > 0 else ORDER_WORDS[1] if step < 0 else ORDER_WORDS[2]
    question = f"how does the {_ORDINALS[index]} tone compare to the {_ORDINALS[index - 1]}?"
    return question, answer, [index, index - 1]
