"""A user's own data, in the conventions the ecosystem already uses, as conversations to fine-tune on.

`load_conversations` takes a data set as users have it and returns rows in the conversational vision-language
convention TRL uses: a `messages` column whose user turns hold `{"type": "image"}` / `{"type": "audio"}` parts, and
`images` / `audios` columns with the media in the order of those parts. It reads:

- a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`;
- a JSON lines (`.jsonl`) or JSON file, through `load_dataset("json")`; image columns may hold paths relative to
  the file;
- an image or audio folder with a `metadata.jsonl` naming each file in `file_name` (the `imagefolder` /
  `audiofolder` convention);
- anything else `load_dataset` takes (a local data set folder, or a Hub name when the machine can reach the Hub).

Rows already holding `messages` keep them (with `images`, or one image in `image`; `audios`). Other rows are built
from a question and an answer column and an optional image or audio column, named by the arguments. Audio files
(WAV, FLAC, OGG, MP3; paths, bytes, or `datasets.Audio` columns) are decoded with `soundfile`, so no FFmpeg or
torchcodec is needed.
`check_conversations` then reads every row once, before any training, and names the first bad row: placeholder and
media counts that differ, media that do not decode, missing columns, a conversation without an assistant reply.
"""

import io
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Audio, Dataset, DatasetDict, LargeList, List, load_dataset, load_from_disk
from PIL import Image

__all__ = ["check_conversations", "load_conversations"]

_AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")


def load_conversations(
    source: str | os.PathLike | Dataset | DatasetDict,
    split: str = "train",
    question_column: str = "question",
    answer_column: str = "answer",
    image_column: str = "image",
    audio_column: str = "audio",
) -> Dataset:
    """Load `source` and return its `split` as conversations (`messages`, `images`, `audios`), every row checked.

    Args:
        source (`str`, `os.PathLike`, `Dataset` or `DatasetDict`): a `save_to_disk` folder, a `.jsonl` / `.json`
            file, an image folder with a `metadata.jsonl`, a name or path `datasets.load_dataset` takes, or a data
            set already in memory.
        split (`str`, defaults to `"train"`): the split to read.
        question_column, answer_column (`str`): the columns of the user's question and the reference answer, for
            rows without `messages`.
        image_column, audio_column (`str`): the column of a row's image (a PIL image, a path, or `{"path"}` /
            `{"bytes"}`) or clip (`{"array", "sampling_rate"}`), for rows without `messages`; either may be absent.

    Returns:
        `datasets.Dataset` with `messages`, `images` (a list per row) and `audios` (a list per row of
        `{"array", "sampling_rate"}`).

    Raises:
        `ValueError`: an unknown split, missing columns, or a bad row (`check_conversations`).
    """
    if isinstance(source, (Dataset, DatasetDict)):
        dataset, base = _split(source, split, "the data set"), Path.cwd()
    else:
        dataset = _load(Path(source) if Path(source).exists() else source, split)
        base = Path(source).parent if Path(source).is_file() else Path(source)
    if "messages" not in dataset.column_names:
        missing = [name for name in (question_column, answer_column) if name not in dataset.column_names]
        if missing:
            raise ValueError(
                f"{source}: no `messages` column and no {missing} column(s) (columns: {dataset.column_names}); "
                "name the question and answer columns with question_column / answer_column"
            )
    rows = [_conversation(dataset[index], index, base, question_column, answer_column, image_column, audio_column)
            for index in range(len(dataset))]  # fmt: skip
    conversations = Dataset.from_list(rows)
    check_conversations(conversations)
    return conversations


def _load(source, split: str) -> Dataset:
    if isinstance(source, Path) and source.is_dir() and _saved_to_disk(source):
        loaded = load_from_disk(str(source))
    elif isinstance(source, Path) and source.suffix in (".jsonl", ".json"):
        loaded = load_dataset("json", data_files={split: str(source)})
    elif isinstance(source, Path) and (source / "metadata.jsonl").is_file():
        if any(path.suffix.lower() in _AUDIO_SUFFIXES for path in source.rglob("*")):
            # the audio folder convention, read without `load_dataset("audiofolder")`: its `datasets.Audio` column
            # needs torchcodec and FFmpeg even to store a path; `file_name` becomes `audio`, relative to the folder
            loaded = load_dataset("json", data_files={split: str(source / "metadata.jsonl")})
            loaded = loaded.rename_column("file_name", "audio")
        else:
            loaded = load_dataset("imagefolder", data_dir=str(source))
    else:
        loaded = load_dataset(str(source))
    return _undecoded_audio(_split(loaded, split, source))


def _undecoded_audio(dataset: Dataset) -> Dataset:
    """`dataset` with its `datasets.Audio` columns as `{"path", "bytes"}` (decoding them would need torchcodec)."""
    for name, feature in dataset.features.items():
        if isinstance(feature, Audio) and feature.decode:
            dataset = dataset.cast_column(name, Audio(decode=False))
        elif isinstance(feature, (List, LargeList)) and isinstance(feature.feature, Audio):
            dataset = dataset.cast_column(name, type(feature)(Audio(decode=False)))
    return dataset


def _split(loaded: Dataset | DatasetDict, split: str, source) -> Dataset:
    if isinstance(loaded, DatasetDict):
        if split not in loaded:
            raise ValueError(f"{source} has no split {split!r}; it has {list(loaded)}")
        return loaded[split]
    return loaded


def _saved_to_disk(folder: Path) -> bool:
    return (folder / "dataset_info.json").is_file() or (folder / "dataset_dict.json").is_file()


def _conversation(row, index, base, question_column, answer_column, image_column, audio_column) -> dict[str, Any]:
    if "messages" in row:
        images = row.get("images")
        if images is None:
            images = [row[image_column]] if row.get(image_column) is not None else []
        audios = row.get("audios") or []
        return {
            "messages": _plain_messages(row["messages"]),
            "images": [_image(image, index, base) for image in images],
            "audios": [_audio(audio, index, base) for audio in audios],
        }
    content = []
    images = [_image(row[image_column], index, base)] if row.get(image_column) is not None else []
    audios = [_audio(row[audio_column], index, base)] if row.get(audio_column) is not None else []
    content += [{"type": "image", "text": None}] * len(images) + [{"type": "audio", "text": None}] * len(audios)
    content.append({"type": "text", "text": str(row[question_column])})
    messages = [
        {"role": "user", "content": content},
        {"role": "assistant", "content": [{"type": "text", "text": str(row[answer_column])}]},
    ]
    return {"messages": messages, "images": images, "audios": audios}


def _plain_messages(messages) -> list[dict[str, Any]]:
    """Messages with every content as a list of `{"type", "text"}` parts (a plain string becomes one text part)."""
    plain = []
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        plain.append(
            {"role": message["role"], "content": [{"type": p["type"], "text": p.get("text")} for p in content]}
        )
    return plain


def _image(image, index: int, base: Path) -> Image.Image:
    try:
        if isinstance(image, Image.Image):
            return image.convert("RGB")
        if isinstance(image, Mapping):
            if image.get("bytes") is not None:
                return Image.open(io.BytesIO(image["bytes"])).convert("RGB")
            image = image.get("path")
        path = Path(image)
        return Image.open(path if path.is_absolute() else base / path).convert("RGB")
    except Exception as error:  # noqa: BLE001 - any decoding failure is reported with the row
        raise ValueError(f"row {index}: the image {str(image)[:80]!r} could not be read ({error})") from error


def _audio(audio, index: int, base: Path) -> dict[str, Any]:
    if isinstance(audio, (str, os.PathLike)) or (
        isinstance(audio, Mapping) and "array" not in audio and ("path" in audio or "bytes" in audio)
    ):
        audio = _decode_audio(audio, index, base)
    if not isinstance(audio, Mapping) or "array" not in audio or "sampling_rate" not in audio:
        raise ValueError(
            f"row {index}: a clip must be {{'array', 'sampling_rate'}}, a file path or {{'path'}} / {{'bytes'}}, got "
            f"{type(audio).__name__}"
        )
    array = np.asarray(audio["array"], dtype=np.float32)
    if array.ndim != 1 or array.size == 0 or not np.isfinite(array).all():
        raise ValueError(f"row {index}: a clip must be a non-empty 1-D array of finite samples, got {array.shape}")
    return {"array": array.tolist(), "sampling_rate": int(audio["sampling_rate"])}


def _decode_audio(audio, index: int, base: Path) -> dict[str, Any]:
    """A sound file (a path, or `{"path"}` / `{"bytes"}`) as a mono `{"array", "sampling_rate"}`."""
    import soundfile

    if isinstance(audio, Mapping):
        source = io.BytesIO(audio["bytes"]) if audio.get("bytes") is not None else audio.get("path")
    else:
        source = audio
    if not isinstance(source, io.BytesIO):
        path = Path(source)
        source = path if path.is_absolute() else base / path
    try:
        array, rate = soundfile.read(source, dtype="float32", always_2d=True)
    except Exception as error:  # noqa: BLE001 - any decoding failure is reported with the row
        name = "the clip's bytes" if isinstance(source, io.BytesIO) else repr(str(source)[:80])
        raise ValueError(f"row {index}: the audio {name} could not be read ({error})") from error
    return {"array": array.mean(axis=1), "sampling_rate": rate}


def check_conversations(rows: Dataset) -> None:
    """Raise `ValueError` naming the first row whose media parts and media differ in number, or that has no
    assistant reply or no user turn."""
    for index in range(len(rows)):
        row = rows[index]
        parts = [part["type"] for message in row["messages"] for part in message["content"]]
        for kind, media in (("image", row["images"]), ("audio", row["audios"])):
            placeholders = parts.count(kind)
            if placeholders != len(media):
                raise ValueError(
                    f"row {index}: {placeholders} {kind} part(s) in `messages` but {len(media)} {kind}(s) given"
                )
        roles = [message["role"] for message in row["messages"]]
        if "user" not in roles or "assistant" not in roles:
            raise ValueError(
                f"row {index}: a conversation needs a user turn and an assistant reply, got roles {roles}"
            )
        for message in row["messages"]:
            if message["role"] == "assistant" and not any(
                part["type"] == "text" and part["text"] for part in message["content"]
            ):
                raise ValueError(f"row {index}: an assistant turn has no text to train on")
