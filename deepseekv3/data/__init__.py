"""Built-in synthetic multimodal data sets, generated on the fly as `datasets.DatasetDict`s; nothing is downloaded.

- `build_shapes_dataset`: 32x32 images of one to three coloured shapes with captions, one question per image
  (`color`, `shape`, `count`, `spatial`, and the held-out `color_by_side`), and each object's box.
- `build_tones_dataset`: 1 s clips of one to three tones (low / mid / high) with captions and questions about pitch,
  count and order (question type `audio`).
- `build_multimodal_dataset`: both in one table. `build_text_corpus`: their text, for training the tokenizer.
- `build_edge_cases`: the same columns for the long tail (`EDGE_CASE_KINDS`: three-object scenes, objects at the
  border, tones back to back), its own splits, to mix into the core with `mix_datasets`.
- `boxes_to_patch_weights`: the referred objects' boxes as a per-patch distribution (attention distillation).
- `load_conversations`: a user's own data set (saved, JSON lines, image folder, ...) as conversations to fine-tune on.
- `mix_datasets`: "core 80% + edge cases 20%", a mix with an exact share of edge cases (or interleaved streams).
- `split_held_out`: the rows of the held-out templates, which instruction tuning leaves to a LoRA fine-tuning task.

Every answer is one word from a closed set (`QUESTION_TEMPLATES[name].answers`), so accuracy is exact match. The
same seed gives identical data; no two rows share an image or a clip, so the splits are disjoint.
"""

try:
    import datasets  # noqa: F401
except ImportError as error:
    raise ImportError("deepseekv3.data needs the `datasets` library: pip install 'deepseekv3[train]'") from error

from .conversations import check_conversations, load_conversations
from .edge_cases import EDGE_CASE_KINDS, build_edge_cases
from .mixing import mix_datasets
from .multimodal import MULTIMODAL_FEATURES, build_multimodal_dataset, build_text_corpus
from .questions import (
    COLORS,
    DEFAULT_HELD_OUT_TEMPLATES,
    NUMBER_WORDS,
    ORDER_WORDS,
    PITCHES,
    QUESTION_TEMPLATES,
    QUESTION_TYPES,
    RELATIONS,
    SHAPES,
    QuestionTemplate,
    build_messages,
)
from .regions import boxes_to_patch_weights
from .shapes import SHAPES_FEATURES, build_shapes_dataset, draw_shapes
from .splits import DEFAULT_SPLIT_SIZES, split_held_out
from .tones import PITCH_FREQUENCIES, TONES_FEATURES, build_tones_dataset, synthesize_tones

__all__ = [
    "COLORS",
    "DEFAULT_HELD_OUT_TEMPLATES",
    "DEFAULT_SPLIT_SIZES",
    "EDGE_CASE_KINDS",
    "MULTIMODAL_FEATURES",
    "NUMBER_WORDS",
    "ORDER_WORDS",
    "PITCHES",
    "PITCH_FREQUENCIES",
    "QUESTION_TEMPLATES",
    "QUESTION_TYPES",
    "RELATIONS",
    "SHAPES",
    "SHAPES_FEATURES",
    "TONES_FEATURES",
    "QuestionTemplate",
    "boxes_to_patch_weights",
    "check_conversations",
    "build_edge_cases",
    "build_messages",
    "build_multimodal_dataset",
    "build_shapes_dataset",
    "build_text_corpus",
    "build_tones_dataset",
    "load_conversations",
    "mix_datasets",
    "draw_shapes",
    "split_held_out",
    "synthesize_tones",
]
