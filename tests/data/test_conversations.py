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
