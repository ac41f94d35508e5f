"""Reinforcement learning on output quality: TRL's `GRPOTrainer`, unmodified, with verifiable rewards.

The policy is an instruction-tuned model; each prompt is a question about an image, and each of its sampled replies
is rewarded by two functions of TRL's reward interface (`(completions, **columns) -> list[float]`):

- `exact_match_reward`: 1 when the reply equals the reference answer, ignoring case and surrounding whitespace
  (`deepseekv3.training.evaluation.exact_match`, what users are scored on), else 0;
- `one_word_reward`: 1 when the reply is a single word of letters (the closed answers' format), else 0.

`grpo_dataset` turns conversations (`deepseekv3.data.load_conversations` rows) into TRL's prompt rows, and
`build_grpo_trainer` sets up a `GRPOTrainer` on our model and processor. `deepseekv3 train --stage grpo` runs it
from the command line, with every `GRPOConfig` option.
"""

import re
from collections.abc import Callable, Sequence
from typing import Any

from datasets import Dataset
from transformers import PreTrainedModel
from transformers.utils import logging

from .evaluation import last_reply

logger = logging.get_logger(__name__)

__all__ = ["DEFAULT_REWARD_FUNCS", "build_grpo_trainer", "exact_match_reward", "grpo_dataset", "one_word_reward"]

_ONE_WORD = re.compile(r"[^\W\d_]+")


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
        float(_reply_text(completion).strip().casefold() == reference.strip().casefold())
        for completion, reference in zip(completions, answer, strict=True)
    ]


def one_word_reward(completions: Sequence[Any], **kwargs: Any) -> list[float]:
    """1.0 for each reply that is one word of letters (surrounding whitespace ignored), else 0.0."""
    return [float(_ONE_WORD.fullmatch(_reply_text(completion).strip()) is not None) for completion in completions]


DEFAULT_REWARD_FUNCS: tuple[Callable[..., list[float]], ...] = (exact_match_reward, one_word_reward)


def grpo_dataset(conversations: Dataset) -> Dataset:
    """TRL prompt rows from conversations with images: `prompt` (the messages before the last reply), `images` and
    `answer` (the last reply's text, the reference `exact_match_reward` reads).

    Rows with audio are left out, with a warning: TRL's `GRPOTrainer` passes images to the processor, not audio.

    Args:
        conversations (`datasets.Dataset`): `load_conversations` rows (`messages`, `images`, `audios`).

    Raises:
        `ValueError`: no row has an image and no audio.
    """
    missing = sorted({"messages", "images", "audios"} - set(conversations.column_names))
    if missing:
        raise ValueError(
            f"conversations need the columns {missing} (load them with deepseekv3.data.load_conversations)"
        )
    keep = [index for index, (images, audios) in enumerate(zip(conversations["images"], conversations["audios"]))
            if images and not audios]  # fmt: skip
    if not keep:
        raise ValueError(
            f"none of the {len(conversations)} conversations has an image and no audio: the GRPO stage trains on "
            "image questions (TRL's GRPOTrainer passes images to the processor, not audio)"
        )
    if len(keep) < len(conversations):
        logger.warning(
            f"GRPO: {len(conversations) - len(keep)} of {len(conversations)} conversations left out (audio, or no "
            "image)"
        )
    kept = conversations.select(keep)

    def to_prompt(row: dict[str, Any]) -> dict[str, Any]:
        last = max(index for index, message in enumerate(row["messages"]) if message["role"] == "assistant")
        return {"prompt": row["messages"][:last], "answer": last_reply(row)}

    return kept.map(to_prompt, remove_columns=["messages", "audios"])


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
