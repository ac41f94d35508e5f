"""A user's own data in the ecosystem's conventions: loaded as conversations, checked before training, encoded with
labels on the assistant turns only."""

import json

import numpy as np
import pytest
import torch
from datasets import Dataset
from PIL import Image
from transformers import TrainingArguments

from deepseekv3.data import build_text_corpus, load_conversations
from deepseekv3.tokenization import train_tokenizer
from deepseekv3.training.collators import InstructionCollator, encode_conversations
from deepseekv3.training.demo import DemoSettings, build_demo_model
from deepseekv3.training.evaluation import exact_match, generate_conversation_replies, last_reply
from deepseekv3.training.recipes import build_stage_trainer


@pytest.fixture(scope="module")
def demo_model():
    settings = DemoSettings(hidden_size=48, num_hidden_layers=2)
    tokenizer = train_tokenizer(build_text_corpus(24, 12, 0), vocab_size=320)
    return build_demo_model(tokenizer, settings)


def _picture(color) -> Image.Image:
    return Image.new("RGB", (20, 16), color)


def _write_images(folder, count=4):
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for index in range(count):
        name = f"picture_{index}.png"
        _picture((40 * index, 100, 200)).save(folder / name)
        names.append(name)
    return names


def test_json_lines_with_question_answer_and_image_paths(tmp_path):
    names = _write_images(tmp_path / "pictures")
    lines = [
        {"q": f"what is in picture {i}?", "a": f"letter {i}", "picture": f"pictures/{n}"} for i, n in enumerate(names)
    ]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(line) for line in lines))

    rows = load_conversations(tmp_path / "data.jsonl", question_column="q", answer_column="a", image_column="picture")

    assert len(rows) == 4 and rows[2]["images"][0].size == (20, 16)
    assert rows[2]["messages"][0]["content"][0]["type"] == "image"
    assert rows[2]["messages"][0]["content"][1]["text"] == "what is in picture 2?"
    assert rows[2]["messages"][1] == {"role": "assistant", "content": [{"type": "text", "text": "letter 2"}]}


def test_image_folder_with_metadata(tmp_path):
    names = _write_images(tmp_path / "folder")
    metadata = [{"file_name": name, "question": "which letter?", "answer": f"l{i}"} for i, name in enumerate(names)]
    (tmp_path / "folder" / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in metadata))

    rows = load_conversations(tmp_path / "folder")

    assert sorted(row["messages"][1]["content"][0]["text"] for row in rows) == ["l0", "l1", "l2", "l3"]
    assert all(len(row["images"]) == 1 for row in rows)


def test_audio_folder_with_metadata_decodes_the_files_without_ffmpeg(tmp_path):
    import soundfile

    folder = tmp_path / "clips"
    folder.mkdir()
    waves = {}
    for index, (name, rate) in enumerate((("a.wav", 16000), ("b.flac", 8000))):
        # a stereo clip: the rows hold its mono mix
        wave = np.stack([np.linspace(-0.5, 0.5, rate // 4), np.full(rate // 4, 0.25 * index)], axis=1)
        soundfile.write(folder / name, wave, rate)
        waves[name] = (wave.mean(axis=1), rate)
    metadata = [{"file_name": name, "question": "which?", "answer": name} for name in waves]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in metadata))

    rows = load_conversations(folder)

    for row in rows:
        expected, rate = waves[row["messages"][1]["content"][0]["text"]]
        assert [part["type"] for part in row["messages"][0]["content"]] == ["audio", "text"]
        assert row["audios"][0]["sampling_rate"] == rate and not row["images"]
        np.testing.assert_allclose(row["audios"][0]["array"], expected, atol=1e-4)


def test_a_data_set_in_memory_and_sound_files_by_path(tmp_path):
    import soundfile

    soundfile.write(tmp_path / "tone.wav", np.sin(np.linspace(0, 300, 4000)), 8000)
    rows = load_conversations(
        Dataset.from_list([{"q": "what?", "a": "a tone", "clip": str(tmp_path / "tone.wav")}]),
        question_column="q",
        answer_column="a",
        audio_column="clip",
    )
    assert rows[0]["audios"][0]["sampling_rate"] == 8000 and len(rows[0]["audios"][0]["array"]) == 4000
    (tmp_path / "broken.wav").write_bytes(b"RIFF not a wave file")
    with pytest.raises(ValueError, match=r"row 0: the audio '.*broken.wav' could not be read"):
        load_conversations(
            Dataset.from_list([{"question": "what?", "answer": "?", "audio": str(tmp_path / "broken.wav")}])
        )


def test_a_datasets_audio_column_is_read_without_torchcodec(tmp_path):
    import io

    import soundfile
    from datasets import Audio

    encoded = io.BytesIO()
    soundfile.write(encoded, np.sin(np.linspace(0, 200, 8000)), 8000, format="WAV")
    rows = Dataset.from_dict(
        {"audio": [{"bytes": encoded.getvalue(), "path": None}], "question": ["?"], "answer": ["a"]}
    )
    # a decoding `datasets.Audio` column, as a data set saved where torchcodec is installed has it
    rows.cast_column("audio", Audio(decode=False)).cast_column("audio", Audio()).save_to_disk(tmp_path / "saved")

    loaded = load_conversations(tmp_path / "saved")

    assert loaded[0]["audios"][0]["sampling_rate"] == 8000
    np.testing.assert_allclose(loaded[0]["audios"][0]["array"], np.sin(np.linspace(0, 200, 8000)), atol=1e-4)


def test_saved_messages_with_images_and_audios(tmp_path):
    clip = {"array": np.sin(np.linspace(0, 400, 8000)).astype(np.float32), "sampling_rate": 8000}
    Dataset.from_list(
        [
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "colour?"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": "blue"}]},
                    {"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "and this?"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": "a tone"}]},
                ],
                "images": [_picture((0, 0, 255))],
                "audios": [clip],
            }
        ]
        * 3
    ).save_to_disk(tmp_path / "saved")

    rows = load_conversations(tmp_path / "saved")

    assert len(rows) == 3 and len(rows[0]["images"]) == 1 and rows[0]["audios"][0]["sampling_rate"] == 8000


def test_bad_rows_are_named_before_training(tmp_path):
    good = {"question": "what?", "answer": "this", "image": "pictures/picture_0.png"}
    _write_images(tmp_path / "pictures", count=1)
    cases = {
        "row 1: the image 'pictures/missing.png' could not be read": [good, {**good, "image": "pictures/missing.png"}],
        "no `messages` column and no ['answer'] column": [{"question": "what?", "image": "pictures/picture_0.png"}],
    }
    for message, lines in cases.items():
        path = tmp_path / "bad.jsonl"
        path.write_text("\n".join(json.dumps(line) for line in lines))
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            load_conversations(path)
    mismatch = [
        {
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "two"}]},
            ],
            "images": [_picture((1, 2, 3))],
        }
    ]
    Dataset.from_list(mismatch).save_to_disk(tmp_path / "mismatch")
    with pytest.raises(ValueError, match=r"row 0: 2 image part\(s\) in `messages` but 1 image\(s\) given"):
        load_conversations(tmp_path / "mismatch")


def test_encoded_conversations_train_on_the_assistant_turns_only(tmp_path, demo_model):
    model, processor = demo_model
    clip = {"array": np.sin(np.linspace(0, 800, 16000)).astype(np.float32), "sampling_rate": 16000}
    rows = Dataset.from_list(
        [
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour?"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
                    {"role": "user", "content": [{"type": "text", "text": "sure?"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": "yes"}]},
                ],
                "images": [_picture((255, 0, 0))],
                "audios": [],
            },
            {
                "messages": [
                    {"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "how many tones?"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": "one"}]},
                ],
                "images": [],
                "audios": [clip],
            },
        ]
    )
    rows.save_to_disk(tmp_path / "saved")
    examples = encode_conversations(processor, load_conversations(tmp_path / "saved"), progress=False)

    tokenizer = processor.tokenizer
    trained = [tokenizer.decode(example["input_ids"][example["labels"] != -100]) for example in examples]
    assert trained[0].replace("\n", "") == "red<|end|>yes<|end|>"
    assert trained[1].replace("\n", "") == "one<|end|>"
    assert examples[0]["pixel_values"].shape == (1, 3, 32, 32) and "input_features" in examples[1]
    batch = InstructionCollator(model.config)(examples)
    loss = model(**batch).loss
    assert torch.isfinite(loss)

    arguments = TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=2, use_cpu=True,
        report_to=[], remove_unused_columns=False, save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    before = [parameter.detach().clone() for parameter in model.parameters()]
    build_stage_trainer("instruct", model, examples, arguments).train()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_exact_match_scores_greedy_replies_against_the_last_reply(tmp_path, demo_model):
    model, processor = demo_model
    rows = Dataset.from_list(
        [
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour?"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": name}]},
                ],
                "images": [_picture(rgb)],
                "audios": [],
            }
            for name, rgb in [("Red", (255, 0, 0)), ("blue", (0, 0, 255)), ("red", (250, 0, 0))]
        ]
    )
    assert [last_reply(row) for row in rows] == ["Red", "blue", "red"]
    assert exact_match(rows, [" red ", "green", "red"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="rows \\(3\\) and replies \\(2\\)"):
        exact_match(rows, ["red", "blue"])
    replies = generate_conversation_replies(model, processor, rows, max_new_tokens=3, progress=False)
    assert len(replies) == 3 and all(isinstance(reply, str) for reply in replies)
    assert (
        exact_match(rows, replies)
        == sum(r.casefold() == last_reply(row).casefold() for r, row in zip(replies, rows)) / 3
    )


def _write_convention(kind: str, folder) -> object:
    """A small data set in one of the conventions users have theirs in; returns what to pass to load_conversations."""
    import soundfile

    folder.mkdir(parents=True)
    if kind == "json lines":
        names = _write_images(folder / "pictures")
        lines = [{"question": "what?", "answer": f"l{i}", "image": f"pictures/{name}"} for i, name in enumerate(names)]
        (folder / "rows.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
        return folder / "rows.jsonl"
    if kind in ("image folder", "audio folder"):
        names = []
        for index in range(4):
            if kind == "image folder":
                names.append(f"{index}.png")
                _picture((50 * index, 0, 0)).save(folder / names[-1])
            else:
                names.append(f"{index}.wav")
                soundfile.write(folder / names[-1], np.sin(np.linspace(0, 100 * (index + 1), 4000)), 16000)
        metadata = [{"file_name": name, "question": "which?", "answer": f"n{i}"} for i, name in enumerate(names)]
        (folder / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in metadata))
        return folder
    clip = {"array": np.sin(np.linspace(0, 300, 8000)).astype(np.float32), "sampling_rate": 8000}
    user = [{"type": "image"}, {"type": "audio"}, {"type": "text", "text": "both?"}]
    row = {
        "messages": [
            {"role": "user", "content": user},
            {"role": "assistant", "content": [{"type": "text", "text": "y"}]},
        ],
        "images": [_picture((0, 90, 0))],
        "audios": [clip],
    }
    Dataset.from_list([row] * 4).save_to_disk(folder / "saved")
    return folder / "saved"


@pytest.mark.parametrize("kind", ["json lines", "image folder", "audio folder", "saved messages"])
def test_each_convention_loads_and_trains(tmp_path, demo_model, kind):
    model, processor = demo_model
    rows = load_conversations(_write_convention(kind, tmp_path / "data"))
    examples = encode_conversations(processor, rows, progress=False)
    media = {"image": "pixel_values", "audio": "input_features"}
    parts = {part["type"] for part in rows[0]["messages"][0]["content"]} - {"text"}
    assert parts and all(media[part] in examples[0] for part in parts)
    arguments = TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=2, use_cpu=True,
        report_to=[], remove_unused_columns=False, save_strategy="no", disable_tqdm=True, logging_steps=1,
    )  # fmt: skip
    before = [parameter.detach().clone() for parameter in model.parameters()]
    trainer = build_stage_trainer("instruct", model, examples, arguments)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
