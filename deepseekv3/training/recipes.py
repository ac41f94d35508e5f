"""The three alignment stages and the LoRA fine-tuning task as `Trainer` recipes.

A recipe decides which rows a stage trains on, which collator turns them into model inputs (and so which loss terms
the forward computes), which parameters train, and the attention backend it needs:

- `contrastive`: every row, its caption paired with its image or clip; `contrastive_loss` (symmetric InfoNCE).
- `distill`: every question except the held-out task; `distillation_loss` on the image questions (text-to-image
  attention against the referred objects' regions) plus `lm_loss` on every answer, the audio ones included (with
  image questions only, audio got the instruct stage's steps alone: 0.83 against 0.90 with them in
  `bench_alignment`, chosen on validation). Eager attention: the loss reads the attention probabilities.
- `instruct`: every question except the held-out task; `lm_loss` on the assistant's reply only.
- `lora`: the held-out task; `lm_loss` on the reply, LoRA adapters only (the model arrives wrapped by PEFT).

Every stage trains all the parameters it reaches (the LM head gets no gradient from the contrastive loss).
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from datasets import Dataset
from transformers import PreTrainedModel, TrainingArguments

from ..configuration_deepseekv3 import DeepseekV3MultimodalConfig
from .collators import ContrastiveCollator, DistillationCollator, InstructionCollator
from .trainer import DeepseekV3Trainer

__all__ = [
    "LORA_OPTIONS",
    "STAGES",
    "StageArguments",
    "TRAIN_STAGES",
    "build_stage_trainer",
    "select_stage_examples",
]

STAGES = ("contrastive", "distill", "instruct", "lora")
# what `deepseekv3 train --stage` runs: the recipes above, and reinforcement learning with TRL's GRPOTrainer and
# DPOTrainer (`deepseekv3.training.rl`)
TRAIN_STAGES = (*STAGES, "grpo", "dpo")
# `StageArguments` fields only `--stage lora` reads: another stage refuses them (given or true), not ignores them
LORA_OPTIONS = ("lora_rank", "lora_media_front_end", "merge")
# with `--edge_dataset`, the share of edge cases when `--edge_fraction` is not given (the seed's 80/20)
DEFAULT_EDGE_FRACTION = 0.2


@dataclass
class StageArguments:
    """What to train; parsed with `HfArgumentParser` next to `TrainingArguments`."""

    stage: str = field(
        default="instruct",
        metadata={
            "help": "stage to run; grpo (TRL's GRPOTrainer, every GRPOConfig option) improves an instruction-tuned "
            "--model_name_or_path on image questions with exact-match and one-word rewards; dpo (TRL's DPOTrainer, "
            "every DPOConfig option) on the questions it answers wrong, the reference answer preferred to its reply",
            "choices": TRAIN_STAGES,
        },
    )
    stages: str = field(
        default="",
        metadata={
            "help": "a whole flow instead of one --stage: stages separated by commas (contrastive,distill,instruct,"
            "grpo), each starting from the model the one before saved, in --output_dir/NN-stage; a rerun skips the "
            "finished stages and resumes the unfinished one from its last checkpoint (deepseekv3.training.pipeline)"
        },
    )
    stage_steps: str = field(
        default="",
        metadata={"help": "--stages: max_steps per stage, e.g. contrastive=200,distill=1400 (others: --max_steps)"},
    )
    model_name_or_path: str = field(
        default="", metadata={"help": "saved model + processor folder to start from (empty: build the demo model)"}
    )
    num_images: int = field(default=2000, metadata={"help": "images in the built-in data set"})
    num_clips: int = field(default=1000, metadata={"help": "audio clips in the built-in data set"})
    dataset_seed: int = field(default=0, metadata={"help": "seed of the built-in data set"})
    lora_rank: int | None = field(default=None, metadata={"help": "stage lora: the LoRA rank (default 8)"})
    lora_media_front_end: bool = field(
        default=False,
        metadata={
            "help": "stage lora: also adapt the image stem, patch embedding and audio frame embedding, for pictures "
            "or sounds unlike the base model's"
        },
    )
    dataset: str = field(
        default="",
        metadata={
            "help": "your own data for instruct / lora / grpo / dpo: a save_to_disk folder, a .jsonl file, an image "
            "folder with metadata.jsonl, or a load_dataset name (empty: the built-in data)"
        },
    )
    dataset_split: str = field(default="train", metadata={"help": "the split of --dataset to train on"})
    eval_dataset: str = field(
        default="",
        metadata={
            "help": "your own evaluation data, as --dataset: its loss, and the exact match of greedy generate "
            "against the reference reply when every reference is short (5 words at most), at each evaluation "
            "(--eval_strategy steps --eval_steps N)"
        },
    )
    eval_dataset_split: str = field(default="validation", metadata={"help": "the split of --eval_dataset"})
    edge_dataset: str = field(
        default="",
        metadata={
            "help": "edge cases to mix into --dataset (as --dataset, the same columns): --edge_fraction of the "
            "training rows come from it (deepseekv3.data.mix_datasets)"
        },
    )
    edge_dataset_split: str = field(default="train", metadata={"help": "the split of --edge_dataset"})
    edge_fraction: float | None = field(
        default=None,
        metadata={
            "help": "the share of edge cases in the mix, in [0, 1): of --edge_dataset with --dataset (default 0.2: "
            "the seed's 80/20), or, on the built-in data, of its edge cases (deepseekv3.data.build_edge_cases)"
        },
    )
    question_column: str = field(default="question", metadata={"help": "--dataset rows without messages: question"})
    answer_column: str = field(default="answer", metadata={"help": "--dataset rows without messages: answer"})
    image_column: str = field(default="image", metadata={"help": "--dataset rows without messages: image"})
    audio_column: str = field(default="audio", metadata={"help": "--dataset rows without messages: audio clip"})
    merge: bool = field(
        default=False,
        metadata={"help": "stage lora: save the model with the adapter merged in, instead of the PEFT adapter"},
    )
    packing_max_tokens: int = field(
        default=0,
        metadata={
            "help": "stages instruct / lora: pack whole examples into rows of at most this many tokens "
            "(MultimodalPackingCollator; each keeps the loss it has alone); 0 pads one example per row"
        },
    )


def select_stage_examples(stage: str, rows: Dataset, examples: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The encoded examples (`encode_rows` of `rows`) a stage trains on; see the module docstring."""
    if stage not in STAGES:
        raise ValueError(f"stage ({stage!r}) must be one of {STAGES}")
    if len(rows) != len(examples):
        raise ValueError(f"{len(rows)} rows but {len(examples)} encoded examples: encode every row once")
    held_out = rows["held_out"]
    keep = {
        "contrastive": lambda index: True,
        "distill": lambda index: not held_out[index],
        "instruct": lambda index: not held_out[index],
        "lora": lambda index: held_out[index],
    }[stage]
    return [example for index, example in enumerate(examples) if keep(index)]


def _collator(stage: str, config: DeepseekV3MultimodalConfig, packing_max_tokens: int):
    if packing_max_tokens and stage not in ("instruct", "lora"):
        raise ValueError(f"packing trains the instruct and lora stages; {stage} batches whole rows (pass 0)")
    if stage == "contrastive":
        return ContrastiveCollator(config)
    if stage == "distill":
        return DistillationCollator(config)
    return InstructionCollator(config, packing_max_tokens=packing_max_tokens)


def build_stage_trainer(
    stage: str,
    model: PreTrainedModel,
    train_examples: Sequence[Mapping[str, Any]],
    args: TrainingArguments,
    callbacks: Sequence[Any] = (),
    eval_examples: Sequence[Mapping[str, Any]] | None = None,
    packing_max_tokens: int = 0,
) -> DeepseekV3Trainer:
    """A `DeepseekV3Trainer` set up for `stage`.

    Args:
        stage (`str`): one of `STAGES`.
        model: a `DeepseekV3MultimodalForConditionalGeneration`, or a PEFT model around one for `lora`.
        train_examples: encoded examples (`encode_rows`), as `select_stage_examples` gives them.
        args (`TrainingArguments`): every Trainer option; `remove_unused_columns` must be False (the collators read
            fields the model's forward does not take).
        callbacks: extra `TrainerCallback`s.
        eval_examples: encoded examples to evaluate the loss on (`args.eval_strategy`), batched like the training ones.
        packing_max_tokens (`int`, defaults to 0): `instruct` / `lora` only: pack each batch's examples into rows of
            at most this many tokens (`MultimodalPackingCollator`) instead of padding one example per row.

    Returns:
        `DeepseekV3Trainer`, ready for `.train()`.
    """
    if args.remove_unused_columns:
        raise ValueError("the stage collators read fields the forward does not take: pass remove_unused_columns=False")
    if stage == "distill":
        # the distillation loss reads each layer's attention probabilities, which only eager attention returns
        model.set_attn_implementation("eager")
    return DeepseekV3Trainer(
        model=model,
        args=args,
        train_dataset=list(train_examples),
        eval_dataset=list(eval_examples) if eval_examples is not None else None,
        data_collator=_collator(stage, model.config, packing_max_tokens),
        callbacks=list(callbacks),
    )
