"""Question answering accuracy per question type: closed-set scoring, free generation, and the floors to beat.

Every question of the built-in data has a closed set of one-word answers (`QUESTION_TEMPLATES[name].answers`).

- Scoring (`predict_answers`, `evaluate_accuracy`): the model's answer is the candidate whose reply
  (`answer<|end|>`) is most likely after the prompt; accuracy is exact match, and chance is `1 / number of
  candidates`. Scoring instead of free generation keeps a small model's accuracy comparable across stages (an answer
  is never lost to formatting).
- Generation (`generate_answers`, `evaluate_generated_accuracy`): the question asked as a user asks it (chat
  template, generation prompt, greedy `generate`), the reply decoded and stripped; accuracy is exact match of the
  reply, and `invalid_reply_rate` counts the replies that are none of the allowed answers.
- Floors (`floor_accuracies`): what a model must beat without understanding the media: chance, the majority answer
  of the training rows, and the best simple picture-based guess (an object present in the scene).
"""

import math
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback
from transformers.utils import logging

from ..data import QUESTION_TEMPLATES
from ..processing_deepseekv3 import DeepseekV3MultimodalProcessor
from .collators import InstructionCollator, conversation_with_media, conversation_with_media_lists

__all__ = [
    "FLOORS",
    "ExactMatchCallback",
    "chance_accuracy",
    "evaluate_accuracy",
    "evaluate_generated_accuracy",
    "exact_match",
    "floor_accuracies",
    "generate_answers",
    "generate_conversation_replies",
    "invalid_reply_rate",
    "last_reply",
    "predict_answers",
    "reply_accuracy",
    "same_reply",
]

logger = logging.get_logger(__name__)

# The names `floor_accuracies` returns, in order.
FLOORS = ("chance", "majority", "heuristic", "strongest")
# Templates with a picture-based heuristic: the attribute it guesses, from an object drawn from the scene.
_PICTURE_HEURISTICS = {"color": "color", "shape": "shape", "color_by_side": "color"}


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
    _check_answers(_plain_rows(rows, ("question_type", "question_template", "answer")))  # before the work
    predictions = predict_answers(model, processor, rows, examples, batch_size=batch_size, progress=progress)
    return reply_accuracy(rows, predictions)


def chance_accuracy(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Expected accuracy of a uniform guess among each row's allowed answers, per question type."""
    rows = _plain_rows(rows, ("question_type", "question_template"))
    return _per_type_mean(rows, [1.0 / len(_answers(rows, index)) for index in range(len(rows))])


def _per_type_mean(rows: Sequence[Mapping[str, Any]], values: Sequence[float]) -> dict[str, float]:
    """Mean of `values` (one per row) over the rows of each question type, types in sorted order."""
    sums, counts = defaultdict(float), defaultdict(int)
    for row, value in zip(rows, values):
        sums[row["question_type"]] += value
        counts[row["question_type"]] += 1
    return {question_type: sums[question_type] / counts[question_type] for question_type in sorted(counts)}


def _plain_rows(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> list[Mapping[str, Any]]:
    """The rows as a list; a `datasets.Dataset` is read with only `columns` (its media are not decoded)."""
    if hasattr(rows, "select_columns") and hasattr(rows, "column_names"):
        return rows.select_columns([column for column in columns if column in rows.column_names]).to_list()
    return [rows[index] for index in range(len(rows))]


def _check_answers(rows: Sequence[Mapping[str, Any]], name: str = "row") -> None:
    """Each row's `question_template` is known and its `answer` is among that template's answers."""
    for index in range(len(rows)):
        answers = _answers(rows, index)
        answer = rows[index]["answer"]
        if answer not in answers:
            raise ValueError(
                f"answer ({answer!r}) of {name} {index} is not among the answers of its question_template "
                f"{rows[index]['question_template']!r}: {answers}"
            )


def _picture_heuristic(row: Mapping[str, Any], index: int) -> float:
    """Expected accuracy on `row` of answering with the colour (or shape) of an object drawn uniformly from the scene:
    from every object for `color` and `shape`, from every object but the one the question names (the anchor,
    `referred_objects[1]`) for `color_by_side`."""
    template = row["question_template"]
    objects = row.get("objects")
    if not objects:
        raise ValueError(f"row {index} ({template!r}) has no objects: the picture heuristic reads the scene")
    candidates = list(objects)
    if template == "color_by_side":
        referred = row.get("referred_objects") or []
        if len(referred) != 2 or not all(0 <= position < len(objects) for position in referred):
            raise ValueError(
                f"referred_objects ({referred}) of row {index} ({template!r}) must be [answer object, named object], "
                f"indices into its {len(objects)} objects"
            )
        candidates = [item for position, item in enumerate(objects) if position != referred[1]]
    attribute = _PICTURE_HEURISTICS[template]
    return sum(item[attribute] == row["answer"] for item in candidates) / len(candidates)


def floor_accuracies(
    rows: Sequence[Mapping[str, Any]], train_rows: Sequence[Mapping[str, Any]]
) -> dict[str, dict[str, float]]:
    """The accuracies a model must beat on `rows` without understanding the media, per question type (rows grouped
    by their `question_type`, as [`evaluate_accuracy`] does).

    - `"chance"`: a uniform guess among the template's answers ([`chance_accuracy`]).
    - `"majority"`: for each `question_template`, its most frequent answer in `train_rows` (a tie goes to the answer
      listed first in the template's answers), scored by exact match on `rows`.
    - `"heuristic"`: the expected accuracy (exact, not sampled) of the best simple picture-based guess. `color`
      (names a shape): the colour of an object drawn uniformly from the scene, `1 / n_objects` on the built-in data;
      `shape` (names a colour): the shape of such an object, `1 / n_objects`; `color_by_side` (names the object the
      answer lies beside, `referred_objects[1]`): the colour of an object drawn uniformly from the others,
      `1 / (n_objects - 1)`. Templates with no picture-based guess (`count`, `spatial`, `audio_*`) use the better of
      chance and majority on that template's rows (one strategy per template, not a choice per row).
    - `"strongest"`: per question type, the highest of the three.

    Args:
        rows (`Sequence[Mapping]`): the evaluated rows of the built-in data sets (a `datasets.Dataset` is read
            without decoding its media): `question_type`, `question_template`, `answer`, and for the picture
            templates `objects` and `referred_objects`.
        train_rows (`Sequence[Mapping]`): the rows the model was trained on (`question_template`, `answer`): the
            majority answers come from them.

    Returns:
        `dict[str, dict[str, float]]`: `{floor: {question_type: accuracy}}`, floors in the order of `FLOORS`,
        question types in sorted order, accuracies in `[0, 1]`.

    Raises:
        `ValueError`: `rows` or `train_rows` is empty, a row's `question_template` is unknown or its `answer` is not
            among the template's answers, `train_rows` has no row of a template `rows` asks, or a picture row has no
            `objects` (or a `color_by_side` row's `referred_objects` are not two of its objects).
    """
    rows = _plain_rows(rows, ("question_type", "question_template", "answer", "objects", "referred_objects"))
    train_rows = _plain_rows(train_rows, ("question_template", "answer"))
    if not rows:
        raise ValueError("rows is empty: there is nothing to compute floors for")
    if not train_rows:
        raise ValueError("train_rows is empty: the majority answers come from it")
    _check_answers(rows)
    _check_answers(train_rows, name="train row")
    train_counts: dict[str, Counter] = defaultdict(Counter)
    for row in train_rows:
        train_counts[row["question_template"]][row["answer"]] += 1
    majority_answers = {}
    for template in sorted({row["question_template"] for row in rows}):
        if template not in train_counts:
            raise ValueError(
                f"train_rows has no row of question_template {template!r}: its majority answer is unknown"
            )
        # max keeps the first of equal counts: ties go to the answer listed first
        majority_answers[template] = max(QUESTION_TEMPLATES[template].answers, key=train_counts[template].__getitem__)

    chance = [1.0 / len(QUESTION_TEMPLATES[row["question_template"]].answers) for row in rows]
    majority = [float(row["answer"] == majority_answers[row["question_template"]]) for row in rows]
    heuristic = [
        _picture_heuristic(row, index) if row["question_template"] in _PICTURE_HEURISTICS else math.nan
        for index, row in enumerate(rows)
    ]
    # without a picture-based guess: whichever of chance and majority does better on the template's rows
    for template in majority_answers.keys() - _PICTURE_HEURISTICS.keys():
        indices = [index for index, row in enumerate(rows) if row["question_template"] == template]
        better = max((chance, majority), key=lambda values: sum(values[index] for index in indices))
        for index in indices:
            heuristic[index] = better[index]

    floors = {
        "chance": _per_type_mean(rows, chance),
        "majority": _per_type_mean(rows, majority),
        "heuristic": _per_type_mean(rows, heuristic),
    }
    floors["strongest"] = {
        question_type: max(floors[name][question_type] for name in ("chance", "majority", "heuristic"))
        for question_type in floors["chance"]
    }
    return floors


def _media_conversation(row: Mapping[str, Any], index: int) -> list[dict[str, Any]]:
    """The row's question with its media, without the answer; a media part the row has no media for raises."""
    for message in row["messages"]:
        for part in message["content"]:
            if part["type"] in ("image", "audio") and row.get(part["type"]) is None:
                raise ValueError(
                    f"row {index} ({row['question_template']!r}) shows an {part['type']} but its {part['type']!r} "
                    "is missing"
                )
    return conversation_with_media(row, include_answer=False)


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module,
    processor: DeepseekV3MultimodalProcessor,
    rows: Sequence[Mapping[str, Any]],
    batch_size: int = 16,
    max_new_tokens: int = 8,
    progress: bool = True,
) -> list[str]:
    """Each row's question asked as a user asks it, the model's reply as text.

    The row's conversation without the answer goes through `processor.apply_chat_template(...,
    add_generation_prompt=True)`; `model.generate(..., do_sample=False)` continues it greedily under the model's own
    `generation_config` otherwise (its end-of-turn ids stop a reply); the new tokens are decoded with
    `skip_special_tokens=True` and stripped. Rows are generated `batch_size` at a time, image and audio rows mixed,
    padded on the left so every prompt ends where generation starts: a batch gives the replies of one row at a time
    (up to float rounding, which could flip only a near-tie between two tokens).

    Args:
        model: a `DeepseekV3MultimodalForConditionalGeneration` (or a PEFT model around one); it is put in eval mode
            and left in the mode it was found in.
        processor (`DeepseekV3MultimodalProcessor`): the model's processor.
        rows (`Sequence[Mapping]`): rows of the built-in data sets (one image or one clip each, `messages`); every
            clip must have the same `sampling_rate`.
        batch_size (`int`, *optional*, defaults to 16): rows per `generate` call.
        max_new_tokens (`int`, *optional*, defaults to 8): the longest reply, in tokens.
        progress (`bool`, *optional*, defaults to `True`): show a progress bar.

    Returns:
        `list[str]`: one stripped reply per row (possibly empty, possibly none of the allowed answers).

    Raises:
        `ValueError`: `batch_size` or `max_new_tokens` is below 1, a row's `question_template` is unknown, a row's
            message shows an image or clip the row lacks, or the clips have different sampling rates.
    """
    light_rows = _plain_rows(rows, ("question_type", "question_template", "audio"))
    for index in range(len(light_rows)):
        _answers(light_rows, index)
    rates = {row["audio"]["sampling_rate"] for row in light_rows if row.get("audio") is not None}
    conversations = [_media_conversation(rows[index], index) for index in range(len(rows))]
    return _generate(model, processor, conversations, rates, batch_size, max_new_tokens, progress)


def _generate(model, processor, conversations, rates, batch_size, max_new_tokens, progress) -> list[str]:
    """Greedy replies to `conversations` (prompts without the reply, every clip at one of `rates`), `batch_size` at a
    time, padded on the left."""
    if batch_size < 1:
        raise ValueError(f"batch_size ({batch_size}) must be at least 1")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) must be at least 1")
    if len(rates) > 1:
        raise ValueError(f"the clips have different sampling rates {sorted(rates)}: resample them to one")
    sampling_rate = next(iter(rates), None)
    processor_kwargs = {
        "return_tensors": "pt",
        "sampling_rate": sampling_rate,
        "padding": True,
        # the processor pads on the tokenizer's side (right) unless told; generation continues the last column
        "padding_side": "left",
        "resample_audio": True,
    }
    device = getattr(model, "device", None)
    was_training = model.training
    model.eval()
    replies = []
    try:
        for start in tqdm(
            range(0, len(conversations), batch_size), desc="generating", disable=not progress, leave=False
        ):
            inputs = processor.apply_chat_template(
                conversations[start : start + batch_size],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
                processor_kwargs=processor_kwargs,
            )
            if device is not None:
                inputs = inputs.to(device)
            generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            new_tokens = generated[:, inputs["input_ids"].shape[1] :]
            replies.extend(text.strip() for text in processor.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return replies


def last_reply(row: Mapping[str, Any]) -> str:
    """The text of a `load_conversations` row's last assistant turn: the reference its generated reply is scored on."""
    reply = [message for message in row["messages"] if message["role"] == "assistant"][-1]
    return "".join(part["text"] or "" for part in reply["content"] if part["type"] == "text").strip()


@torch.no_grad()
def generate_conversation_replies(
    model: torch.nn.Module,
    processor: DeepseekV3MultimodalProcessor,
    conversations: Sequence[Mapping[str, Any]],
    batch_size: int = 16,
    max_new_tokens: int = 16,
    progress: bool = True,
) -> list[str]:
    """Greedy replies to `load_conversations` rows, each asked up to its last assistant turn (as in
    [`generate_answers`]); clips at another rate than the feature extractor's are resampled.

    Raises:
        `ValueError`: `batch_size` or `max_new_tokens` is below 1, or the clips have different sampling rates.
    """
    rates = {clip["sampling_rate"] for row in conversations for clip in row["audios"]}
    prompts = [conversation_with_media_lists(row, include_last_reply=False) for row in conversations]
    return _generate(model, processor, prompts, rates, batch_size, max_new_tokens, progress)


def same_reply(reply: str, reference: str) -> bool:
    """Whether `reply` is `reference`, ignoring case and surrounding whitespace (the exact match users get)."""
    return reply.strip().casefold() == reference.strip().casefold()


def exact_match(conversations: Sequence[Mapping[str, Any]], replies: Sequence[str]) -> float:
    """Fraction of `replies` equal to their row's `last_reply` (`same_reply`)."""
    _check_replies(conversations, replies)
    if not replies:
        raise ValueError("no replies to score")
    matches = [same_reply(reply, last_reply(row)) for row, reply in zip(conversations, replies)]
    return sum(matches) / len(matches)


def _check_replies(rows: Sequence[Mapping[str, Any]], replies: Sequence[str]) -> None:
    if len(rows) != len(replies):
        raise ValueError(f"rows ({len(rows)}) and replies ({len(replies)}) must be as many: one reply per row")


def reply_accuracy(rows: Sequence[Mapping[str, Any]], replies: Sequence[str]) -> dict[str, float]:
    """Exact-match accuracy of `replies` (from [`generate_answers`]) per question type.

    Args:
        rows (`Sequence[Mapping]`): the rows (`question_type`, `question_template`, `answer`).
        replies (`Sequence[str]`): one reply per row, compared with the row's `answer` as they are (case and
            whitespace count).

    Returns:
        `dict[str, float]`: accuracy in `[0, 1]` of each question type present in `rows`.

    Raises:
        `ValueError`: `rows` and `replies` differ in length, or a row's `question_template` is unknown or its
            `answer` not among the template's answers.
    """
    rows = _plain_rows(rows, ("question_type", "question_template", "answer"))
    _check_replies(rows, replies)
    _check_answers(rows)
    return _per_type_mean(rows, [float(reply == row["answer"]) for row, reply in zip(rows, replies)])


def invalid_reply_rate(rows: Sequence[Mapping[str, Any]], replies: Sequence[str]) -> dict[str, float]:
    """Fraction of `replies` that are none of the row's allowed answers (`QUESTION_TEMPLATES[...].answers`, exact
    match), per question type: replies lost to formatting or off-topic words rather than a wrong choice.

    Args:
        rows (`Sequence[Mapping]`): the rows (`question_type`, `question_template`).
        replies (`Sequence[str]`): one reply per row.

    Returns:
        `dict[str, float]`: fraction in `[0, 1]` of each question type present in `rows`.

    Raises:
        `ValueError`: `rows` and `replies` differ in length, or a row's `question_template` is unknown.
    """
    rows = _plain_rows(rows, ("question_type", "question_template"))
    _check_replies(rows, replies)
    invalid = [float(reply not in _answers(rows, index)) for index, reply in enumerate(replies)]
    return _per_type_mean(rows, invalid)


def evaluate_generated_accuracy(
    model: torch.nn.Module,
    processor: DeepseekV3MultimodalProcessor,
    rows: Sequence[Mapping[str, Any]],
    batch_size: int = 16,
    max_new_tokens: int = 8,
    progress: bool = True,
) -> dict[str, float]:
    """Exact-match accuracy of the generated replies per question type: [`reply_accuracy`] of
    [`generate_answers`]. To also count the replies outside the allowed answers, call [`generate_answers`] once and
    pass its replies to [`reply_accuracy`] and [`invalid_reply_rate`].

    Args: as [`generate_answers`].

    Returns:
        `dict[str, float]`: accuracy in `[0, 1]` of each question type present in `rows`.

    Raises:
        `ValueError`: as [`generate_answers`], or a row's `answer` is not among its template's answers (checked
            before generating).
    """
    _check_answers(_plain_rows(rows, ("question_type", "question_template", "answer")))
    replies = generate_answers(
        model, processor, rows, batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress
    )
    return reply_accuracy(rows, replies)


class ExactMatchCallback(TrainerCallback):
    """At each evaluation, the exact match (`exact_match`) of greedy replies to `conversations` (`load_conversations`
    rows), added to the evaluation's metrics as `eval_exact_match` and to the log history.

    Args:
        processor (`DeepseekV3MultimodalProcessor`): the model's processor.
        conversations (`Sequence[Mapping]`): the evaluation rows, each scored on its last assistant turn.
        max_new_tokens (`int`, *optional*, defaults to 16): the longest reply generated.
    """

    def __init__(self, processor: DeepseekV3MultimodalProcessor, conversations, max_new_tokens: int = 16):
        self.processor, self.conversations, self.max_new_tokens = processor, conversations, max_new_tokens

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
        replies = generate_conversation_replies(
            model, self.processor, self.conversations, max_new_tokens=self.max_new_tokens, progress=False
        )
        score = exact_match(self.conversations, replies)
        if metrics is not None:
            metrics["eval_exact_match"] = score
        state.log_history.append({"eval_exact_match": score, "step": state.global_step})
        logger.warning(f"step {state.global_step}: exact match of greedy replies {score:.3f}")
