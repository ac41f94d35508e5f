"""TRL's `SFTTrainer` fine-tunes our model with our processor on a user's conversations (`load_conversations`),
through TRL's own vision-language collator, with the loss on the assistant replies only."""

import pytest
import torch
from datasets import Dataset
from PIL import Image
from trl import SFTConfig, SFTTrainer

from deepseekv3.data import build_text_corpus, load_conversations
from deepseekv3.tokenization import train_tokenizer
from deepseekv3.training.demo import DemoSettings, build_demo_model


# TRL 1.16's SFTConfig sets `gradient_checkpointing`, which transformers 5.24 deprecates for activation_checkpointing
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")
def test_sft_trainer_trains_on_the_assistant_replies_of_image_conversations(tmp_path):
    settings = DemoSettings(hidden_size=48, num_hidden_layers=2)
    model, processor = build_demo_model(train_tokenizer(build_text_corpus(24, 12, 0), vocab_size=320), settings)
    rows = [
        {
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": name}]},
            ],
            "images": [Image.new("RGB", (40, 30), rgb)],
        }
        for name, rgb in [("red", (255, 0, 0)), ("blue", (0, 0, 255))] * 4
    ]
    Dataset.from_list(rows).save_to_disk(tmp_path / "mine")
    conversations = load_conversations(tmp_path / "mine").remove_columns("audios")  # TRL's collator reads images

    args = SFTConfig(
        output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=2, use_cpu=True, report_to=[],
        save_strategy="no", assistant_only_loss=True, max_length=None, disable_tqdm=True,
    )  # fmt: skip
    trainer = SFTTrainer(model=model, args=args, train_dataset=conversations, processing_class=processor)
    batch = next(iter(trainer.get_train_dataloader()))
    trained = processor.tokenizer.decode(batch["labels"][0][batch["labels"][0] != -100])
    assert trained in ("red<|end|>", "blue<|end|>")
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    before = [parameter.detach().clone() for parameter in model.parameters()]
    trainer.train()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


# TRL 1.16's GRPOConfig sets `gradient_checkpointing` and its trainer reads `is_gradient_checkpointing`; transformers
# 5.24 deprecates both names (in favour of activation_checkpointing), and the suite turns warnings into errors
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_grpo_trainer_runs_our_model_and_processor_on_image_prompts_of_different_lengths(tmp_path):
    """TRL's GRPOTrainer, unmodified: it renders the chat template, tokenizes the text again (one BOS), generates
    from left-padded prompts of different lengths, and updates the model from the rewards."""
    from trl import GRPOConfig, GRPOTrainer

    settings = DemoSettings(hidden_size=48, num_hidden_layers=2)
    model, processor = build_demo_model(train_tokenizer(build_text_corpus(24, 12, 0), vocab_size=320), settings)
    questions = ["what colour?", "what colour is the picture you see here?"]
    rows = [
        {
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
            "image": Image.new("RGB", (40, 30), rgb),
        }
        for question, rgb in zip(questions * 4, [(255, 0, 0), (0, 0, 255)] * 4, strict=True)
    ]
    prompts_seen = []

    def reward_letter_e(prompts, completions, **kwargs):
        """Varies between the sampled completions of an untrained model, so the policy gradient is not zero."""
        prompts_seen.extend(prompts)
        return [float(completion[0]["content"].count("e")) for completion in completions]

    args = GRPOConfig(
        output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, num_generations=4,
        max_completion_length=6, learning_rate=1e-2, use_cpu=True, report_to=[], save_strategy="no",
        disable_tqdm=True, gradient_checkpointing=False, logging_steps=1,
        # TRL suppresses the image placeholder alone; keep the model's own list (image and audio placeholders)
        generation_kwargs={"suppress_tokens": model.generation_config.suppress_tokens},
    )  # fmt: skip
    trainer = GRPOTrainer(
        model=model, args=args, reward_funcs=[reward_letter_e], train_dataset=Dataset.from_list(rows),
        processing_class=processor,
    )  # fmt: skip
    placeholders = [processor.tokenizer.convert_tokens_to_ids(token) for token in ("<image>", "<audio>")]
    assert sorted(trainer.generation_config.suppress_tokens) == sorted(placeholders)
    before = [parameter.detach().clone() for parameter in model.parameters()]
    trainer.train()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert {len(prompt[0]["content"][1]["text"]) for prompt in prompts_seen} == {len(q) for q in questions}
    # what TRL tokenizes: the rendered prompts, padded on the left, one BOS each
    distinct = list({prompt[0]["content"][1]["text"]: prompt for prompt in prompts_seen}.values())
    rendered = [processor.apply_chat_template(prompt, add_generation_prompt=True) for prompt in distinct]
    batch = processor(text=rendered, images=[row["image"] for row in rows[:2]], padding=True, return_tensors="pt")
    bos, pad = processor.tokenizer.bos_token_id, processor.tokenizer.pad_token_id
    assert (batch["input_ids"] == bos).sum(-1).tolist() == [1, 1]
    assert (batch["input_ids"][:, -1] != pad).all()  # padded on the left: every prompt ends where generation starts
    assert max(entry["reward_std"] for entry in trainer.state.log_history if "reward_std" in entry) > 0
