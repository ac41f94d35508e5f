"""Question templates, closed answer sets and chat formatting shared by the built-in data sets.

Every question the built-in data asks comes from one `QuestionTemplate` in `QUESTION_TEMPLATES`: its name (kept in the
`question_template` column), its coarse `question_type` (the one evaluation reports group by: `color`, `shape`,
`count`, `spatial`, `audio`), the modality it asks about, and the closed set of single-word answers, so accuracy is
exact match and chance is `1 / len(answers)`. A template named in `held_out_templates` marks its rows `held_out=True`:
instruction tuning filters them out and a later fine-tuning task (LoRA) trains and evaluates on them alone.
"""

import dataclasses
from collections.abc import Collection, Sequence

from datasets import List, Value

__all__ = [
    "COLORS",
    "COMMON_FEATURES",
    "DEFAULT_HELD_OUT_TEMPLATES",
    "NUMBER_WORDS",
    "ORDER_WORDS",
    "PITCHES",
    "QUESTION_TEMPLATES",
    "QUESTION_TYPES",
    "RELATIONS",
    "SHAPES",
    "QuestionTemplate",
    "build_messages",
    "resolve_templates",
]

COLORS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
NUMBER_WORDS = ("one", "two", "three")
# Where the second-named object lies relative to the first.
RELATIONS = ("left", "right", "above", "below")
PITCHES = ("low", "mid", "high")
# How a tone compares with the tone before it.
ORDER_WORDS = ("higher", "lower", "same")
QUESTION_TYPES = ("color", "shape", "count", "spatial", "audio")

# Columns every built-in data set has, whatever its media.
_MESSAGES_FEATURE = List(
    {"role": Value("string"), "content": List({"type": Value("string"), "text": Value("string")})}
)
COMMON_FEATURES = {
    "modality": Value("string"),
    "caption": Value("string"),
    "question": Value("string"),
    "answer": Value("string"),
    "question_type": Value("string"),
    "question_template": Value("string"),
    "referred_objects": List(Value("int32")),
    "held_out": Value("bool"),
    "messages": _MESSAGES_FEATURE,
}


@dataclasses.dataclass(frozen=True)
class QuestionTemplate:
    """One kind of question.

    Args:
        name (`str`): the value of the `question_template` column.
        question_type (`str`): one of `QUESTION_TYPES`; evaluation reports accuracy per question type.
        modality (`str`): `"image"` or `"audio"`.
        answers (`tuple[str, ...]`): every answer the template can have (single words).
        min_items (`int`): the fewest objects (or tones) an example needs for the question to make sense.
    """

    name: str
    question_type: str
    modality: str
    answers: tuple[str, ...]
    min_items: int = 1


QUESTION_TEMPLATES: dict[str, QuestionTemplate] = {
    template.name: template
    for template in (
        # "what colour is the circle?"
        QuestionTemplate("color", "color", "image", COLORS),
        # "what shape is the red object?"
        QuestionTemplate("shape", "shape", "image", SHAPES),
        # "how many shapes are there?"
        QuestionTemplate("count", "count", "image", NUMBER_WORDS),
        # "which side of the red circle is the blue square?"
        QuestionTemplate("spatial", "spatial", "image", RELATIONS, min_items=2),
        # "what colour is the object left of the red circle?": a colour answer found through a spatial relation.
        QuestionTemplate("color_by_side", "color", "image", COLORS, min_items=2),
        # "what is the pitch of the second tone?"
        QuestionTemplate("audio_pitch", "audio", "audio", PITCHES),
        # "how many tones are there?"
        QuestionTemplate("audio_count", "audio", "audio", NUMBER_WORDS),
        # "how does the second tone compare to the first?"
        QuestionTemplate("audio_order", "audio", "audio", ORDER_WORDS, min_items=2),
    )
}
# Kept out of instruction tuning for the LoRA fine-tuning task: it composes two skills stage 3 teaches separately
# (reading a spatial relation, naming a colour), so a small adapter can learn it from a few hundred examples.
DEFAULT_HELD_OUT_TEMPLATES = ("color_by_side",)


def resolve_templates(
    modality: str, templates: Sequence[str] | None, held_out_templates: Collection[str]
) -> tuple[tuple[str, ...], frozenset[str]]:
    """Check template names for one modality; `None` means every template of that modality.

    Held-out names of the other modality are ignored, so one `held_out_templates` serves both builders.
    """
    own = tuple(name for name, template in QUESTION_TEMPLATES.items() if template.modality == modality)
    unknown = sorted(set(held_out_templates) - set(QUESTION_TEMPLATES))
    if unknown:
        raise ValueError(f"unknown held_out_templates {unknown}; known: {sorted(QUESTION_TEMPLATES)}")
    if templates is None:
        templates = own
    wrong = [name for name in templates if name not in own]
    if wrong or not templates:
        raise ValueError(f"templates ({list(templates)}) must be a non-empty subset of the {modality} templates {own}")
    held_out = frozenset(held_out_templates) & frozenset(own)
    missing = sorted(held_out - set(templates))
    if missing:
        raise ValueError(f"held_out_templates {missing} are not among the generated templates {list(templates)}")
    return tuple(templates), held_out


def build_messages(question: str, answer: str, modality: str) -> list[dict]:
    """A one-turn conversation in the transformers chat convention: the user shows the media and asks, the assistant
    answers.

    Args:
        question (`str`): the user's question.
        answer (`str`): the assistant's answer.
        modality (`str`): `"image"` or `"audio"`, the media part placed before the question.

    Returns:
        `list[dict]`: `[{"role": "user", "content": [{"type": modality}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]}]`. Parts carry a `text` key set to
        `None` where they have no text, the shape a `datasets` struct column reads back as.
    """
    return [
        {"role": "user", "content": [{"type": modality, "text": None}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]
