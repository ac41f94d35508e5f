"""The reinforcement stages: GRPO's verifiable rewards and prompt rows, DPO's preference pairs, and
`deepseekv3 train --stage grpo / dpo` through TRL's own trainers."""

import json
import logging

import pytest
import torch
from datasets import Dataset
from PIL import Image
from test_recipes import _refused, _run, _train_command
from transformers import AutoModelForCausalLM

from deepseekv3.data import build_text_corpus, load_conversations
from deepseekv3.tokenization import train_tokenizer
from deepseekv3.training.demo import DemoSettings, build_demo_model
from deepseekv3.training.evaluation import generate_conversation_replies
from deepseekv3.training.rl import (
    build_dpo_trainer,
    build_grpo_trainer,
    exact_match_reward,
    grpo_dataset,
    one_word_reward,
    preference_pairs,
)


def _reply(text: str) -> list[dict]:
    """A completion as TRL gives it for conversational prompts."""
    return [{"role": "assistant", "content": text}]


def test_exact_match_reward_scores_the_reply_as_users_are_scored():
    completions = [_reply("red"), _reply(" Red\n"), _reply("blue"), _reply("red circle"), "red", _reply("")]
    answers = ["red", "red", "red", "red", "red", "red"]
    assert exact_match_reward(completions, answer=answers) == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    parts = [[{"role": "assistant", "content": [{"type": "text", "text": "left"}]}]]
    assert exact_match_reward(parts, answer=["left"]) == [1.0]
    with pytest.raises(ValueError, match="as many"):
        exact_match_reward(completions, answer=["red"])


def test_one_word_reward_wants_a_single_word_of_letters():
    completions = [_reply("red"), _reply(" circle "), _reply("red circle"), _reply("red."), _reply(""), _reply("3")]
    assert one_word_reward(completions) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def _conversations(with_audio: bool = False, answers=("red", "blue")) -> Dataset:
    rows = [
        {"question": "what colour is it?", "answer": name, "image": Image.new("RGB", (24, 24), rgb)}
        for name, rgb in zip(answers, [(220, 30, 30), (30, 30, 220)], strict=True)
    ]
    if with_audio:
        rows.append({"question": "how many tones?", "answer": "two", "audio": {"array": [0.0] * 800,
                                                                             "sampling_rate": 16000}})  # fmt: skip
    return load_conversations(Dataset.from_list(rows))


def test_grpo_rows_are_the_prompt_before_the_last_reply_and_its_text(caplog):
    with caplog.at_level(logging.WARNING):
        rows = grpo_dataset(_conversations(with_audio=True))
    assert "1 of 3 conversations left out" in caplog.text
    assert len(rows) == 2 and rows["answer"] == ["red", "blue"]
    prompt = rows[0]["prompt"]
    assert [message["role"] for message in prompt] == ["user"]
    assert [part["type"] for part in prompt[0]["content"]] == ["image", "text"]
    assert len(rows[0]["images"]) == 1


def test_grpo_rows_need_image_conversations():
    only_audio = _conversations(with_audio=True).select([2])
    with pytest.raises(ValueError, match="has an image and no audio"):
        grpo_dataset(only_audio)
    with pytest.raises(ValueError, match="load_conversations"):
        grpo_dataset(Dataset.from_list([{"prompt": "hi"}]))


# TRL 1.16's GRPOConfig sets `gradient_checkpointing`, which transformers 5.24 deprecates
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")
def test_grpo_trainer_keeps_both_media_placeholders_out_of_replies(tmp_path):
    from trl import GRPOConfig

    settings = DemoSettings(hidden_size=48, num_hidden_layers=2)
    model, processor = build_demo_model(train_tokenizer(build_text_corpus(24, 12, 0), vocab_size=320), settings)
    args = GRPOConfig(output_dir=str(tmp_path), num_generations=4, per_device_train_batch_size=4, use_cpu=True,
                      report_to=[])  # fmt: skip
    trainer = build_grpo_trainer(model, processor, grpo_dataset(_conversations()), args)
    placeholders = [processor.tokenizer.convert_tokens_to_ids(token) for token in ("<image>", "<audio>")]
    assert sorted(trainer.generation_config.suppress_tokens) == sorted(placeholders)
    args.num_generations = 1
    with pytest.raises(ValueError, match="num_generations"):
        build_grpo_trainer(model, processor, grpo_dataset(_conversations()), args)


def _tiny_model():
    torch.manual_seed(0)
    settings = DemoSettings(hidden_size=48, num_hidden_layers=2)
    return build_demo_model(train_tokenizer(build_text_corpus(24, 12, 0), vocab_size=320), settings)


def test_preference_pairs_prefer_the_reference_to_the_models_own_wrong_replies():
    model, processor = _tiny_model()
    replies = generate_conversation_replies(model, processor, _conversations(), progress=False, max_new_tokens=8)
    assert all(replies), replies  # the untrained model says something to each
    # the first question's reference is what the model replies: only the second is answered wrong
    conversations = _conversations(with_audio=True, answers=(replies[0], "blue"))
    pairs = preference_pairs(model, processor, conversations)
    assert len(pairs) == 1 and len(pairs[0]["images"]) == 1
    assert pairs[0]["chosen"] == [{"role": "assistant", "content": [{"type": "text", "text": "blue"}]}]
    assert pairs[0]["rejected"][0]["content"][0]["text"] == replies[1] != "blue"
    assert [message["role"] for message in pairs[0]["prompt"]] == ["user"]
    with pytest.raises(ValueError, match="nothing to prefer"):
        preference_pairs(model, processor, _conversations(answers=tuple(replies)))


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")
def test_dpo_trainer_needs_a_reference_model_unless_peft_gives_one(tmp_path):
    from trl import DPOConfig

    model, processor = _tiny_model()
    pairs = preference_pairs(model, processor, _conversations())
    args = DPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match="ref_model"):
        build_dpo_trainer(model, processor, pairs, args)


def test_train_command_runs_grpo_on_an_instruct_model_with_the_rewards(tmp_path):
    base = tmp_path / "base"
    _run(_train_command(base, "instruct"))
    lines = [json.dumps({"question": "what colour is it?", "answer": name, "image": f"{index}.png"})
             for index, (name, color) in enumerate([("red", (220, 30, 30)), ("blue", (30, 30, 220))] * 2)]  # fmt: skip
    for index, color in enumerate([(220, 30, 30), (30, 30, 220)] * 2):
        Image.new("RGB", (24, 24), color).save(tmp_path / f"{index}.png")
    (tmp_path / "mine.jsonl").write_text("\n".join(lines))
    grpo = ("--model_name_or_path", str(base), "--num_generations", "4", "--max_completion_length", "4",
            "--logging_steps", "1", "--learning_rate", "1e-3")  # fmt: skip
    for source in ((), ("--dataset", str(tmp_path / "mine.jsonl"))):
        result = _run(_train_command(tmp_path / "grpo", "grpo", *grpo, *source))
        logged = result.stdout + result.stderr
        assert "'rewards/exact_match_reward/mean'" in logged and "'rewards/one_word_reward/mean'" in logged
        assert AutoModelForCausalLM.from_pretrained(tmp_path / "grpo").config.use_image_input
    assert "--model_name_or_path" in _refused(_train_command(tmp_path / "never", "grpo", "--num_generations", "4"))
    assert not (tmp_path / "never").exists()


def test_train_command_runs_dpo_on_the_questions_the_model_answers_wrong(tmp_path):
    base = tmp_path / "base"
    _run(_train_command(base, "instruct"))
    dpo = ("--model_name_or_path", str(base), "--logging_steps", "1", "--learning_rate", "1e-3")
    result = _run(_train_command(tmp_path / "dpo", "dpo", *dpo))
    logged = result.stdout + result.stderr
    assert "preference pairs, one per question the model answers wrong" in logged and "'rewards/margins'" in logged
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "dpo").config.use_image_input
    assert "--model_name_or_path" in _refused(_train_command(tmp_path / "never", "dpo"))
