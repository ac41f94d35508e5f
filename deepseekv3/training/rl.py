"""Reinforcement learning on output quality with TRL's trainers, unmodified: `GRPOTrainer` with verifiable rewards,
and `DPOTrainer` on preference pairs made of the model's own wrong replies.

The policy is an instruction-tuned model; each prompt is a question about an image, and each of its sampled replies
is rewarded by two functions of TRL's reward interface (`(completions, **columns) -> list[float]`):

- `exact_match_reward`: 1 when the reply equals the reference answer, ignoring case and surrounding whitespace
  (`deepseekv3.training.evaluation.exact_match`, what users are scored on), else 0;
- `one_word_reward`: 1 when the reply is a single word of letters (the closed answers' format), else 0.

`grpo_dataset` turns conversations (`deepseekv3.data.load_conversations` rows) into TRL's prompt rows, and
`build_grpo_trainer` sets up a `GRPOTrainer` on our model and processor. `deepseekv3 train --stage grpo` runs it
from the command line, with every `GRPOConfig` option.

`preference_pairs` asks the model every question greedily (as users ask it) and keeps those it answers wrong: the
reference answer is `chosen`, the model's own reply `rejected`. `build_dpo_trainer` sets up a `DPOTrainer` on them
against a frozen reference model (`deepseekv3 train --stage dpo` loads it again from `--model_name_or_path`; a PEFT
model needs none, its adapter switched off is the reference).
"""

import re
from collections.abc import Callable, Sequence
from typing import Any

from datasets import Dataset
from transformers import PreTrainedModel
from transformers.utils import logging

from .evaluation import generate_conversation_replies, last_reply, same_reply

logger = logging.get_logger(__name__)

__all__ = [
    "DEFAULT_REWARD_FUNCS",
    "build_dpo_trainer",
    "build_grpo_trainer",
    "exact_match_reward",
    "grpo_dataset",
    "one_word_reward",
    "preference_pairs",
    "seen_image_indices",
]

_ONE_WORD = re.compile(r"[^\W\d_]+")


def seen_image_indices(rows: Dataset) -> list[int]:
    """Indices of the built-in data's rows RL trains on: the image questions, held-out templates left out."""
    return [index for index, (held_out, modality) in enumerate(zip(rows["held_out"], rows["modality"], strict=True))
            if not held_out and modality == "image"]  # fmt: skip


def _reply_text(completion: str | list[dict[str, Any]]) -> str:
    """The text of one completion: a string (standard prompts) or a one-message list (conversational prompts)."""
    if isinstance(completion, str):
        return completion
    content = completion[-1]["content"]
    if isinstance(content, str):
        return content
    return "".join(part.get("text") or "" for part in content if part.get("type") == "text")


def exact_match_reward(completions: Sequence[Any], answer: Sequence[str], **kwargs: Any) -> list[float]:
    """1.0 for each reply equal to its `answer` (case and surrounding whitespace ignored), else 0.0.

    Args:
        completions: TRL's completions, one per sampled reply.
        answer (`Sequence[str]`): the reference answer of each completion's prompt (the data set's `answer`
            column, which TRL passes by name).
    """
    if len(completions) != len(answer):
        raise ValueError(f"completions ({len(completions)}) and answers ({len(answer)}) must be as many")
    return [
        float(same_reply(_reply_text(completion), reference))
        for completion, reference in zip(completions, answer, strict=True)
    ]


def one_word_reward(completions: Sequence[Any], **kwargs: Any) -> list[float]:
    """1.0 for each reply that is one word of letters (surrounding whitespace ignored), else 0.0."""
    return [float(_ONE_WORD.fullmatch(_reply_text(completion).strip()) is not None) for completion in completions]


DEFAULT_REWARD_FUNCS: tuple[Callable[..., list[float]], ...] = (exact_match_reward, one_word_reward)


def _image_conversations(conversations: Dataset, stage: str) -> Dataset:
    """The conversations with an image and no audio (TRL's GRPO and DPO trainers pass images to the processor, not
    audio); the others are left out with a warning."""
    missing = sorted({"messages", "images", "audios"} - set(conversations.column_names))
    if missing:
        raise ValueError(
            f"conversations need the columns {missing} (load them with deepseekv3.data.load_conversations)"
        )
    keep = [index for index, (images, audios) in enumerate(zip(conversations["images"], conversations["audios"]))
            if images and not audios]  # fmt: skip
    if not keep:
        raise ValueError(
            f"none of the {len(conversations)} conversations has an image and no audio: the {stage} stage trains on "
            f"image questions (TRL's {stage.upper()}Trainer passes images to the processor, not audio)"
        )
    if len(keep) < len(conversations):
        logger.warning(
            f"{stage.upper()}: {len(conversations) - len(keep)} of {len(conversations)} conversations left out "
            "(audio, or no image)"
        )
    return conversations.select(keep)


def _prompt(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The messages before the last assistant turn."""
    last = max(index for index, message in enumerate(row["messages"]) if message["role"] == "assistant")
    return row["messages"][:last]


def grpo_dataset(conversations: Dataset) -> Dataset:
    """TRL prompt rows from conversations with images: `prompt` (the messages before the last reply), `images` and
    `answer` (the last reply's text, the reference `exact_match_reward` reads).

    Rows with audio are left out, with a warning: TRL's `GRPOTrainer` passes images to the processor, not audio.

    Args:
        conversations (`datasets.Dataset`): `load_conversations` rows (`messages`, `images`, `audios`).

    Raises:
        `ValueError`: no row has an image and no audio.
    """
    kept = _image_conversations(conversations, "grpo")
    return kept.map(
        lambda row: {"prompt": _prompt(row), "answer": last_reply(row)}, remove_columns=["messages", "audios"]
    )


def build_grpo_trainer(
    model: PreTrainedModel,
    processor: Any,
    train_dataset: Dataset,
    args: Any,
    reward_funcs: Sequence[Callable[..., list[float]]] = DEFAULT_REWARD_FUNCS,
    eval_dataset: Dataset | None = None,
    callbacks: Sequence[Any] = (),
):
    """A `trl.GRPOTrainer` on our model and processor.

    TRL's generation config suppresses the image placeholder alone; the model's own `suppress_tokens` (image and
    audio placeholders, which a reply must never contain) are passed on through `args.generation_kwargs`, unless
    those already set them.

    Args:
        model: a `DeepseekV3MultimodalForConditionalGeneration`, instruction-tuned.
        processor: its `DeepseekV3MultimodalProcessor`.
        train_dataset (`datasets.Dataset`): `grpo_dataset` rows.
        args (`trl.GRPOConfig`): the trainer's arguments (`num_generations`, `max_completion_length`, ...).
        reward_funcs: TRL reward functions (defaults: `exact_match_reward`, `one_word_reward`).
        eval_dataset (`datasets.Dataset`, *optional*): `grpo_dataset` rows to evaluate the rewards on.
        callbacks: `TrainerCallback`s.
    """
    from trl import GRPOTrainer

    if args.num_generations < 2:
        raise ValueError(f"num_generations ({args.num_generations}) must be at least 2: GRPO compares replies")
    suppress = model.generation_config.suppress_tokens
    if suppress:
        args.generation_kwargs = {"suppress_tokens": list(suppress), **(args.generation_kwargs or {})}
    return GRPOTrainer(
        model=model,
        args=args,
        reward_funcs=list(reward_funcs),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
        callbacks=list(callbacks),
    )


def preference_pairs(
    model: PreTrainedModel, processor: Any, conversations: Dataset, batch_size: int = 16, max_new_tokens: int = 8
) -> Dataset:
    """DPO rows from the questions the model answers wrong: `prompt`, `chosen` (the reference reply), `rejected`
    (the model's greedy reply, as `generate_conversation_replies` gives it) and `images`.

    Args:
        model: the model to improve (asked in eval mode, left in the mode it was in).
        processor: its processor.
        conversations (`datasets.Dataset`): `load_conversations` rows; rows with audio are left out.
        batch_size, max_new_tokens (`int`): as in `generate_conversation_replies`.

    Raises:
        `ValueError`: no image conversation, or the model answers every one right (nothing to prefer).
    """
    kept = _image_conversations(conversations, "dpo")
    replies = generate_conversation_replies(model, processor, kept, batch_size, max_new_tokens, progress=False)
    wrong = [index for index, reply in enumerate(replies)
             if not same_reply(reply, last_reply(kept[index]))]  # fmt: skip
    if not wrong:
        raise ValueError(f"the model answers all {len(kept)} questions right: there is nothing to prefer")
    logger.warning(f"DPO: {len(wrong)} preference pairs, one per question the model answers wrong (of {len(kept)})")

    def to_pair(row: dict[str, Any], index: int) -> dict[str, Any]:
        return {
            "prompt": _prompt(row),
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": last_reply(row)}]}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": replies[wrong[index]]}]}],
        }

    return kept.select(wrong).map(to_pair, with_indices=True, remove_columns=["messages", "audios"])


def build_dpo_trainer(
    model: PreTrainedModel,
    processor: Any,
    train_dataset: Dataset,
    args: Any,
    ref_model: PreTrainedModel | None = None,
    callbacks: Sequence[Any] = (),
):
    """A `trl.DPOTrainer` on our model and processor.

    Args:
        model: a `DeepseekV3MultimodalForConditionalGeneration`, or a PEFT model around one.
        processor: its processor.
        train_dataset (`datasets.Dataset`): `preference_pairs` rows.
        args (`trl.DPOConfig`): the trainer's arguments (`beta`, `loss_type`, ...).
        ref_model: the frozen reference, usually the same checkpoint loaded again. Required unless `model` is a PEFT
            model (TRL then switches the adapter off for the reference pass); TRL alone would reload the reference
            from the config's `_name_or_path`, which an in-memory model does not have.
        callbacks: `TrainerCallback`s.
    """
    from peft import PeftModel
    from trl import DPOTrainer

    if ref_model is None and not isinstance(model, PeftModel):
        raise ValueError(
            "pass ref_model (the starting checkpoint, frozen) or a PEFT model, whose base is the reference"
        )
    if ref_model is not None:
        ref_model.eval().requires_grad_(False)
    return DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=train_dataset,
        processing_class=processor,
        callbacks=list(callbacks),
    )
