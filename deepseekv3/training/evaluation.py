"""Closed-set question answering accuracy per question type, by scoring every allowed answer.

Every question of the built-in data has a closed set of one-word answers (`QUESTION_TEMPLATES[name].answers`). The
model's answer is the candidate whose reply (`answer<|end|>`) is most likely after the prompt; accuracy is exact
match, and chance is `1 / number of candidates`. Scoring instead of free generation keeps a small model's accuracy
comparable across stages (an answer is never lost to formatting).
"""

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from ..data import QUESTION_TEMPLATES
from ..processing_deepseekv3 import DeepseekV3MultimodalProcessor
from .collators import InstructionCollator

__all__ = ["chance_accuracy", "evaluate_accuracy", "predict_answers"]


def _candidates(example: Mapping[str, Any], reply_ids: list[torch.Tensor]) -> list[dict[str, Any]]:
    """The example's prompt followed by each candidate reply, labels on the reply."""
    prompt = example["input_ids"][: example["prompt_length"]]
    prompt_types = example["mm_token_type_ids"][: example["prompt_length"]]
    media = {key: example[key] for key in ("pixel_values", "input_features", "input_features_mask") if key in example}
    candidates = []
    for reply in reply_ids:
        candidates.append(
            {
                "input_ids": torch.cat([prompt, reply]),
                "labels": torch.cat([torch.full_like(prompt, -100), reply]),
                "mm_token_type_ids": torch.cat([prompt_types, torch.zeros_like(reply)]),
                **media,
            }
        )
    return candidates


def _answers(rows: Sequence[Mapping[str, Any]], index: int) -> tuple[str, ...]:
    """The closed answer set of `rows[index]`, from its `question_template`."""
    name = rows[index]["question_template"]
    if name not in QUESTION_TEMPLATES:
        raise ValueError(f"question_template ({name!r}) of row {index} is not one of {sorted(QUESTION_TEMPLATES)}")
    return QUESTION_TEMPLATES[name].answers


@torch.no_grad()
def predict_answers(
    model: torch.nn.Module,
    processor: DeepseekV3MultimodalProcessor,
    rows: Sequence[Mapping[str, Any]],
    examples: Sequence[Mapping[str, Any]],
    batch_size: int = 16,
    progress: bool = True,
) -> list[str]:
    """The most likely allowed answer of each row: the one whose reply (its tokens, then `<|end|>`) has the highest
    log-likelihood after the prompt, the sum over the reply's tokens; a tie goes to the answer listed first.

    Args:
        model: a `DeepseekV3MultimodalForConditionalGeneration` (or a PEFT model around one).
        processor (`DeepseekV3MultimodalProcessor`): the model's processor (its tokenizer encodes the answers).
        rows (`Sequence[Mapping]`): rows of the built-in data sets (their `question_template` gives the answers).
        examples (`Sequence[Mapping]`): the same rows through `encode_rows`.
        batch_size (`int`, *optional*, defaults to 16): rows per forward pass (each with all its candidates).
        progress (`bool`, *optional*, defaults to `True`): show a progress bar.

    Returns:
        `list[str]`: one answer per row.

    Raises:
        `ValueError`: `rows` and `examples` differ in length, `batch_size` is below 1, or a row's
            `question_template` is unknown.
    """
    if len(rows) != len(examples):
        raise ValueError(
            f"rows ({len(rows)}) and examples ({len(examples)}) must be as many: examples are the rows through "
            "encode_rows"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size ({batch_size}) must be at least 1")
    answer_sets = [_answers(rows, index) for index in range(len(rows))]
    config = getattr(model, "config", None)
    collator = InstructionCollator(config)
    end_of_turn = processor.tokenizer.convert_tokens_to_ids("<|end|>")
    reply_cache: dict[str, torch.Tensor] = {}

    def reply_ids(answer: str) -> torch.Tensor:
        if answer not in reply_cache:
            tokens = processor.tokenizer(answer, add_special_tokens=False)["input_ids"]
            reply_cache[answer] = torch.tensor([*tokens, end_of_turn])
        return reply_cache[answer]

    was_training = model.training
    model.eval()
    predictions = []
    for start in tqdm(range(0, len(rows), batch_size), desc="scoring answers", disable=not progress, leave=False):
        indices = range(start, min(start + batch_size, len(rows)))
        answers = [answer_sets[index] for index in indices]
        candidates = [
            candidate
            for index, choices in zip(indices, answers)
            for candidate in _candidates(examples[index], [reply_ids(answer) for answer in choices])
        ]
        batch = collator(candidates)
        labels = batch.pop("labels")
        log_probs = torch.log_softmax(model(**batch).logits[:, :-1].float(), dim=-1)
        targets = labels[:, 1:]  # logits at t predict the label at t + 1
        token_log_probs = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        scores = (token_log_probs * (targets != -100)).sum(dim=-1).tolist()
        offset = 0
        for choices in answers:
            best = max(range(len(choices)), key=lambda choice: scores[offset + choice])
            predictions.append(choices[best])
            offset += len(choices)
    model.train(was_training)
    return predictions


def evaluate_accuracy(
    model: torch.nn.Module,
    processor: DeepseekV3MultimodalProcessor,
    rows: Sequence[Mapping[str, Any]],
    examples: Sequence[Mapping[str, Any]],
    batch_size: int = 16,
    progress: bool = True,
) -> dict[str, float]:
    """Exact-match accuracy per question type (`color`, `shape`, `count`, `spatial`, `audio`).

    Args: as [`predict_answers`].

    Returns:
        `dict[str, float]`: accuracy in `[0, 1]` of each question type present in `rows`.

    Raises:
        `ValueError`: as [`predict_answers`], or a row's `answer` is not among its template's answers (no
            prediction could match it).
    """
    for index in range(len(rows)):
        answer = rows[index]["answer"]
        if answer not in _answers(rows, index):
            raise ValueError(
                f"answer ({answer!r}) of row {index} is not among the answers of its question_template "
                f"{rows[index]['question_template']!r}: {_answers(rows, index)}"
            )
    predictions = predict_answers(model, processor, rows, examples, batch_size=batch_size, progress=progress)
    correct, total = defaultdict(int), defaultdict(int)
    for index, prediction in enumerate(predictions):
        question_type = rows[index]["question_type"]
        total[question_type] += 1
        correct[question_type] += int(prediction == rows[index]["answer"])
    return {question_type: correct[question_type] / total[question_type] for question_type in sorted(total)}


def chance_accuracy(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Expected accuracy of a uniform guess among each row's allowed answers, per question type."""
    sums, counts = defaultdict(float), defaultdict(int)
    for index in range(len(rows)):
        row = rows[index]
        sums[row["question_type"]] += 1.0 / len(_answers(rows, index))
        counts[row["question_type"]] += 1
    return {question_type: sums[question_type] / counts[question_type] for question_type in sorted(counts)}
