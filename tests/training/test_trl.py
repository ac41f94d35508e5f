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
