"""The loss-weighting scenario shared by the in-process tests (`test_trainer.py`) and the DDP worker: a tiny model
with every loss term available, rows of different lengths and label counts (so a plain mean of micro-batch means
differs from the batch mean), and a `DeepseekV3Trainer` run with SGD that returns the final weights and the logs."""

import torch
from conftest import TINY_MEDIA_KWARGS, TINY_TEXT_KWARGS

from deepseekv3 import DeepseekV3MultimodalConfig, DeepseekV3MultimodalForConditionalGeneration
from deepseekv3.training.precision import PrecisionTrainingArguments
from deepseekv3.training.trainer import DeepseekV3Trainer

NUM_ROWS = 8  # 2 optimizer steps of 4 rows
NUM_PATCHES = 16
IMAGE_TOKEN_ID = TINY_MEDIA_KWARGS["image_token_id"]

# which loss terms a case switches on; the gate and balance terms exist only next to another loss
CASES = {
    "lm": {"labels"},
    "lm+gate": {"labels", "gate"},
    "lm+balance": {"labels", "balance"},
    "distill": {"distill"},
    "contrastive": {"contrastive"},
    # every term whose big-batch mean decomposes over rows or tokens
    "all": {"labels", "gate", "balance", "distill"},
    # InfoNCE takes its negatives within the micro-batch: exact against the same micro-batches on other processes
    "all+contrastive": {"labels", "gate", "balance", "distill", "contrastive"},
}


def build_model(case: str) -> DeepseekV3MultimodalForConditionalGeneration:
    terms = CASES[case]
    config = DeepseekV3MultimodalConfig(
        **TINY_TEXT_KWARGS,
        **TINY_MEDIA_KWARGS,
        use_attention_gate=True,
        attention_gate_sparsity_weight=0.5 if "gate" in terms else 0.0,
        sequence_balance_loss_weight=0.3 if "balance" in terms else 0.0,
    )
    torch.manual_seed(0)
    model = DeepseekV3MultimodalForConditionalGeneration(config)
    model.set_attn_implementation("eager")  # the distillation loss reads attention probabilities
    return model


def build_rows(case: str) -> list[dict[str, torch.Tensor]]:
    """`NUM_ROWS` examples: BOS, one image, 2-9 text tokens, of which 1 to all are labelled."""
    terms = CASES[case]
    generator = torch.Generator().manual_seed(1)
    rows = []
    for index in range(NUM_ROWS):
        text_len = 2 + (index * 5) % 8
        text = torch.randint(5, TINY_TEXT_KWARGS["vocab_size"], (text_len,), generator=generator)
        input_ids = torch.cat([torch.tensor([1]), torch.full((NUM_PATCHES,), IMAGE_TOKEN_ID), text])
        row = {"input_ids": input_ids, "pixel_values": torch.randn(3, 16, 16, generator=generator)}
        if "labels" in terms:
            labels = torch.full_like(input_ids, -100)
            labelled = 1 + index % text_len
            labels[-labelled:] = input_ids[-labelled:]
            row["labels"] = labels
        if "distill" in terms:
            query_mask = torch.zeros_like(input_ids)
            if index % 4 != 1:  # row 1 and row 5 are not distilled (an audio row batched with image rows)
                query_mask[-(1 + index % 3) :] = 1
            row["distillation_query_mask"] = query_mask
            row["distillation_targets"] = torch.rand(NUM_PATCHES, generator=generator).softmax(dim=0)
        if "contrastive" in terms:
            row["caption"] = torch.randint(5, TINY_TEXT_KWARGS["vocab_size"], (2 + index % 4,), generator=generator)
        rows.append(row)
    return rows


def _pad(tensors: list[torch.Tensor], value: int) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence(tensors, batch_first=True, padding_value=value)


def collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Right padding; the contrastive pairs are each row's caption and image, alone when there is nothing else."""
    batch = {"pixel_values": torch.stack([row["pixel_values"] for row in rows])}
    if "caption" in rows[0]:
        captions = [row["caption"] for row in rows]
        batch["contrastive_input_ids"] = _pad(captions, 0)
        batch["contrastive_attention_mask"] = _pad([torch.ones_like(caption) for caption in captions], 0)
    if "labels" not in rows[0] and "distillation_targets" not in rows[0]:
        return batch
    batch["input_ids"] = _pad([row["input_ids"] for row in rows], 0)
    batch["attention_mask"] = _pad([torch.ones_like(row["input_ids"]) for row in rows], 0)
    if "labels" in rows[0]:
        batch["labels"] = _pad([row["labels"] for row in rows], -100)
    if "distillation_targets" in rows[0]:
        batch["distillation_query_mask"] = _pad([row["distillation_query_mask"] for row in rows], 0)
        batch["distillation_targets"] = torch.stack([row["distillation_targets"] for row in rows])
    return batch


def run(
    case: str, output_dir: str, batch_size: int, accumulation: int, max_steps: int = 2, **overrides
) -> tuple[dict, list[dict]]:
    """`max_steps` SGD steps of `DeepseekV3Trainer` over `NUM_ROWS` rows in order: (final weights, log history)."""
    model = build_model(case)
    args = PrecisionTrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=max_steps,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,  # clipping would rescale a wrongly weighted gradient and hide the error
        train_sampling_strategy="sequential",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        remove_unused_columns=False,
        disable_tqdm=True,
        **overrides,
    )
    trainer = DeepseekV3Trainer(model=model, args=args, train_dataset=build_rows(case), data_collator=collate)
    trainer.train()
    weights = {name: value.detach().clone() for name, value in model.state_dict().items()}
    return weights, [entry for entry in trainer.state.log_history if "loss" in entry]
