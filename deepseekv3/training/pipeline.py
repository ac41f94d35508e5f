"""`deepseekv3 train --stages contrastive,distill,instruct,grpo --output_dir out`: the whole flow in one command.

Each stage is one `deepseekv3 train --stage ...` run (`run_training`), with the command's other options, into
`out/NN-stage` (`01-contrastive`, `02-distill`, ...); every stage after the first starts from the model the one
before saved (a `lora` stage saves its merged model, so the next stage can start from it). `--stage_steps
contrastive=200,distill=1400` sets `max_steps` per stage. An option only some stages take (`--num_generations` for
`grpo`) goes to those; one no stage takes is refused before anything runs.

After each stage the saved model is reloaded and asked the validation questions by greedy `generate` (the built-in
data: `SUMMARY_QUESTIONS_PER_TYPE` per question type, exact match per type; your own with `--eval_dataset`: the exact
match of its replies), and `out/NN-stage/stage_done.json` records the stage, its seconds and that accuracy.
`out/summary.json` holds every finished stage's, and the command prints them as a table.

**Resuming.** Rerun the same command after an interruption: a stage with its `stage_done.json` is skipped, and the
unfinished stage resumes from its last checkpoint in `out/NN-stage` (`resume_from_checkpoint`, so set `--save_steps`
to how much work you are prepared to lose), exactly as an uninterrupted run would have continued.
"""

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from accelerate.state import AcceleratorState
from transformers import HfArgumentParser, TrainingArguments
from transformers.utils import logging

from ..data import build_multimodal_dataset, load_conversations
from .evaluation import exact_match, generate_answers, generate_conversation_replies, reply_accuracy
from .recipes import LORA_OPTIONS, TRAIN_STAGES, StageArguments

logger = logging.get_logger(__name__)

__all__ = ["SUMMARY_QUESTIONS_PER_TYPE", "format_summary", "run_pipeline", "stage_directories"]

# built-in validation questions per question type each stage's model is asked
SUMMARY_QUESTIONS_PER_TYPE = 100
# options the pipeline sets per stage; the command's own values of these are replaced
_PER_STAGE_OPTIONS = ("--stage", "--stages", "--stage_steps", "--output_dir", "--resume_from_checkpoint", "--merge")


def _split_steps(text: str, stages: Sequence[str]) -> dict[str, int]:
    steps = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        if name not in stages or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(
                f"--stage_steps {item!r}: each item is stage=steps, with a stage of --stages {list(stages)} and a "
                "positive whole number of steps"
            )
        steps[name] = int(value)
    return steps


def _without(argv: Sequence[str], options: Sequence[str]) -> list[str]:
    """`argv` without `options` (`--name value`, `--name=value`, or a flag `--name` alone)."""
    kept, skip = [], False
    for token in argv:
        if skip and not token.startswith("--"):
            skip = False
            continue
        skip = False
        name = token.split("=", 1)[0]
        if name in options:
            skip = "=" not in token
            continue
        kept.append(token)
    return kept


def stage_directories(output_dir: str | Path, stages: Sequence[str]) -> list[Path]:
    """`output_dir/01-<first stage>`, `output_dir/02-<second stage>`, ..."""
    return [Path(output_dir) / f"{index:02d}-{stage}" for index, stage in enumerate(stages, start=1)]


def _parse_stage(argv: list[str]) -> tuple[StageArguments, TrainingArguments, set[str]]:
    """The stage's arguments, parsed with its own class (`GRPOConfig` / `DPOConfig` for grpo / dpo), and the option
    names it did not take."""
    from .run import stage_parser

    parser = stage_parser(argv)
    stage_args, training_args, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    training_args.remove_unused_columns = False  # the collators read fields the forward does not take
    return stage_args, training_args, {token.split("=", 1)[0] for token in remaining if token.startswith("--")}


def _stage_accuracy(stage_dir: Path, stage_args: StageArguments) -> dict[str, float]:
    """The saved model of a stage, reloaded and asked the validation questions by greedy `generate`."""
    from .run import load_saved_model

    model, processor = load_saved_model(str(stage_dir))
    if stage_args.eval_dataset:
        columns = (stage_args.question_column, stage_args.answer_column, stage_args.image_column,
                   stage_args.audio_column)  # fmt: skip
        rows = load_conversations(stage_args.eval_dataset, stage_args.eval_dataset_split, *columns)
        return {
            "exact_match": exact_match(rows, generate_conversation_replies(model, processor, rows, progress=False))
        }
    data = build_multimodal_dataset(stage_args.num_images, stage_args.num_clips, seed=stage_args.dataset_seed)
    validation = data["validation"]
    counts: dict[str, int] = {}
    keep = []
    for index, (question_type, held_out) in enumerate(zip(validation["question_type"], validation["held_out"])):
        counts[question_type] = counts.get(question_type, 0) + (not held_out)
        if not held_out and counts[question_type] <= SUMMARY_QUESTIONS_PER_TYPE:
            keep.append(index)
    rows = validation.select(keep)
    return reply_accuracy(rows, generate_answers(model, processor, rows, progress=False))


def format_summary(summary: Sequence[dict[str, Any]]) -> str:
    """A markdown table: one row per finished stage, its steps, seconds and validation accuracy."""
    columns = sorted({name for entry in summary for name in entry["accuracy"]})
    lines = ["| stage | steps | seconds | " + " | ".join(columns) + " |", "| --- |" + " ---: |" * (len(columns) + 2)]
    for entry in summary:
        cells = [f"{entry['accuracy'][name]:.2f}" if name in entry["accuracy"] else "-" for name in columns]
        lines.append(f"| {entry['stage']} | {entry['steps']} | {entry['seconds']:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_pipeline(argv: Sequence[str]) -> list[dict[str, Any]]:
    """Run `--stages` in turn (see the module docstring); returns the summary, one entry per stage.

    Raises:
        `ValueError`: an unknown stage, a bad `--stage_steps`, an option no stage takes, or no `--output_dir`.
    """
    head = HfArgumentParser(StageArguments, add_help=False).parse_args_into_dataclasses(
        args=argv, return_remaining_strings=True
    )[0]
    stages = [name.strip() for name in head.stages.split(",") if name.strip()]
    unknown = [name for name in stages if name not in TRAIN_STAGES]
    if not stages or unknown:
        raise ValueError(f"--stages {head.stages!r}: name stages of {list(TRAIN_STAGES)}, separated by commas")
    steps = _split_steps(head.stage_steps, stages)
    output_dirs = [token.split("=", 1)[-1] if "=" in token else argv[index + 1]
                   for index, token in enumerate(argv) if token.split("=", 1)[0] == "--output_dir"]  # fmt: skip
    if not output_dirs:
        raise ValueError("--stages needs --output_dir: each stage saves its model in a folder of it")
    output_dir = Path(output_dirs[-1])
    common = _without(argv, _PER_STAGE_OPTIONS)
    directories = stage_directories(output_dir, stages)
    plans, unused = [], None
    for index, (stage, directory) in enumerate(zip(stages, directories, strict=True)):
        stage_argv = [*common, "--stage", stage, "--output_dir", str(directory)]
        if index > 0:
            stage_argv = [*_without(stage_argv, ("--model_name_or_path",)), "--model_name_or_path",
                          str(directories[index - 1])]  # fmt: skip
        if stage in steps:
            stage_argv = [*_without(stage_argv, ("--max_steps",)), "--max_steps", str(steps[stage])]
        if stage == "lora":
            stage_argv += ["--merge", "true"]  # the next stage starts from a whole model
        else:  # what only the lora stage reads
            stage_argv = _without(stage_argv, [f"--{name}" for name in LORA_OPTIONS])
        stage_args, training_args, left = _parse_stage(stage_argv)
        unused = left if unused is None else unused & left
        plans.append((stage_args, training_args, directory))
    if unused:
        raise ValueError(f"no stage of --stages {stages} takes {sorted(unused)}")

    from .run import run_training

    summary = []
    for stage_args, training_args, directory in plans:
        done = directory / "stage_done.json"
        if done.exists():
            logger.warning(f"stage {stage_args.stage}: already done in {directory}, skipped")
            summary.append(json.loads(done.read_text()))
            continue
        if any(directory.glob("checkpoint-*")):
            logger.warning(f"stage {stage_args.stage}: resuming from the last checkpoint in {directory}")
            training_args.resume_from_checkpoint = True
        # stages may differ in mixed precision (TRL's configs default to bf16): Accelerate keeps one per process, so
        # its state is cleared between stages (transformers' own trainer tests do the same); the distributed state
        # (`PartialState`) is kept
        AcceleratorState._reset_state()
        started = time.perf_counter()
        run_training(stage_args, training_args)
        entry = {
            "stage": stage_args.stage,
            "output_dir": str(directory),
            "steps": training_args.max_steps,
            "seconds": round(time.perf_counter() - started, 1),
            "accuracy": _stage_accuracy(directory, stage_args),
        }
        done.write_text(json.dumps(entry, indent=2))
        summary.append(entry)
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        logger.warning(f"stage {stage_args.stage} done: validation accuracy {entry['accuracy']}")
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(format_summary(summary))
    return summary
