"""`deepseekv3 train`: run one stage through `Trainer`, from a saved model or from scratch, on the built-in data or,
for `instruct`, `lora`, `grpo` and `dpo`, on your own (`--dataset`: `deepseekv3.data.load_conversations`).

Arguments parse with `HfArgumentParser`, so every `TrainingArguments` option (every `trl.GRPOConfig` or
`trl.DPOConfig` option with `--stage grpo` or `dpo`) is available next to `StageArguments`; the same entry point runs
under `accelerate launch -m deepseekv3.cli train ...`. The trained model and its processor are saved to `--output_dir`;
`--resume_from_checkpoint` continues an interrupted run exactly.
`--stage lora` saves the PEFT adapter (`adapter_config.json` and its weights, for `PeftModel.from_pretrained` on the
base model given by `--model_name_or_path`) and the processor; with `--merge`, the model with the adapter merged in.
"""

from collections.abc import Sequence

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoProcessor, HfArgumentParser, TrainingArguments, set_seed
from transformers.utils import logging

from ..data import build_edge_cases, build_multimodal_dataset, build_text_corpus, load_conversations, mix_datasets
from ..tokenization import train_tokenizer
from .collators import encode_conversations, encode_rows
from .demo import DemoSettings, build_demo_model
from .evaluation import ExactMatchCallback, last_reply
from .recipes import DEFAULT_EDGE_FRACTION, LORA_OPTIONS, StageArguments, build_stage_trainer, select_stage_examples

logger = logging.get_logger(__name__)

__all__ = ["SHORT_REPLY_WORDS", "load_saved_model", "parse_train_arguments", "run_training", "stage_parser"]

# --eval_dataset: references of at most this many words are scored by exact match of greedy `generate` as well
SHORT_REPLY_WORDS = 5


def stage_parser(argv: Sequence[str] | None = None) -> HfArgumentParser:
    """The parser of `--stage`'s arguments: `StageArguments` and `TrainingArguments`, or with `--stage grpo` / `dpo`
    `trl.GRPOConfig` / `trl.DPOConfig` (`TrainingArguments` with TRL's options)."""
    stage = HfArgumentParser(StageArguments, add_help=False).parse_args_into_dataclasses(
        args=argv, return_remaining_strings=True
    )[0]
    arguments_class = TrainingArguments
    if stage.stage in ("grpo", "dpo"):
        import trl

        arguments_class = {"grpo": trl.GRPOConfig, "dpo": trl.DPOConfig}[stage.stage]
    return HfArgumentParser((StageArguments, arguments_class))


def parse_train_arguments(argv: Sequence[str] | None = None) -> tuple[StageArguments, TrainingArguments]:
    """`StageArguments` and the stage's `TrainingArguments` (`stage_parser`) from the command line (`--stage`,
    `--output_dir`, ...)."""
    stage_args, training_args = stage_parser(argv).parse_args_into_dataclasses(args=argv)
    # the collators read fields the forward does not take
    training_args.remove_unused_columns = False
    return stage_args, training_args


def load_saved_model(path: str):
    """A saved model and its processor, to train; on CPU its routed experts run the per-expert loop ("eager"), as
    `build_demo_model` sets (measured there about 6x faster than the default grouped_mm at the demo's sizes)."""
    model = AutoModelForCausalLM.from_pretrained(path)
    if not torch.cuda.is_available():
        model.set_experts_implementation("eager")
    return model, AutoProcessor.from_pretrained(path)


def run_training(stage_args: StageArguments, training_args: TrainingArguments) -> str:
    """Train one stage and save the model and processor to `training_args.output_dir`.

    Returns:
        `str`: the output directory.
    """
    if stage_args.stage == "lora" and not stage_args.merge and not stage_args.model_name_or_path:
        raise ValueError(
            "--stage lora saves an adapter for the base model given by --model_name_or_path; pass one, or --merge to "
            "save the merged model instead"
        )
    given = [f"--{name}" for name in LORA_OPTIONS if getattr(stage_args, name) not in (None, False)]
    if stage_args.stage != "lora" and given:
        raise ValueError(
            f"{', '.join(given)}: options of --stage lora, which --stage {stage_args.stage} does not read"
        )
    if stage_args.edge_fraction is not None and stage_args.dataset and not stage_args.edge_dataset:
        raise ValueError("--edge_fraction is the share of --edge_dataset in the mix: pass --edge_dataset too")
    if stage_args.eval_dataset and not stage_args.dataset:
        raise ValueError("--eval_dataset evaluates training on your own data: pass --dataset too")
    if stage_args.edge_dataset and not stage_args.dataset:
        raise ValueError("--edge_dataset mixes edge cases into your own data: pass --dataset too")
    if stage_args.stage in ("grpo", "dpo") and not stage_args.model_name_or_path:
        raise ValueError(
            f"--stage {stage_args.stage} improves an instruction-tuned model: pass its folder as --model_name_or_path "
            "(an untrained model's replies are all wrong, so there is nothing to learn from)"
        )
    if stage_args.dataset and stage_args.stage not in ("instruct", "lora", "grpo", "dpo"):
        raise ValueError(
            f"--dataset trains the instruct, lora, grpo and dpo stages; --stage {stage_args.stage} needs what only "
            "the built-in data has (captions for contrastive, object boxes for distill)"
        )
    if stage_args.packing_max_tokens and stage_args.stage not in ("instruct", "lora"):
        raise ValueError(
            f"--packing_max_tokens packs the instruct and lora stages; --stage {stage_args.stage} batches whole rows"
        )
    set_seed(training_args.seed)
    columns = (stage_args.question_column, stage_args.answer_column, stage_args.image_column, stage_args.audio_column)
    # read and checked before any model is built
    own = load_conversations(stage_args.dataset, stage_args.dataset_split, *columns) if stage_args.dataset else None
    if stage_args.edge_dataset:
        edge = load_conversations(stage_args.edge_dataset, stage_args.edge_dataset_split, *columns)
        core_rows = len(own)
        fraction = DEFAULT_EDGE_FRACTION if stage_args.edge_fraction is None else stage_args.edge_fraction
        own = mix_datasets(own, edge, fraction, seed=training_args.seed)
        logger.warning(
            f"training on {core_rows} rows of --dataset and {len(own) - core_rows} edge cases drawn from the "
            f"{len(edge)} of --edge_dataset (edge_fraction {fraction})"
        )
    own_eval = (
        load_conversations(stage_args.eval_dataset, stage_args.eval_dataset_split, *columns)
        if stage_args.eval_dataset
        else None
    )
    if stage_args.model_name_or_path:
        model, processor = load_saved_model(stage_args.model_name_or_path)
    else:
        settings = DemoSettings(seed=training_args.seed)
        corpus = build_text_corpus(stage_args.num_images, stage_args.num_clips, stage_args.dataset_seed)
        model, processor = build_demo_model(train_tokenizer(corpus, vocab_size=settings.vocab_size), settings)
    if stage_args.stage in ("grpo", "dpo"):
        return _run_reinforcement(stage_args, training_args, model, processor, own, own_eval)
    if own is not None:
        examples = encode_conversations(processor, own)
    else:
        rows = builtin_training_rows(stage_args, training_args.seed)
        examples = select_stage_examples(stage_args.stage, rows, encode_rows(processor, rows, model.config.patch_size))
    if stage_args.stage == "lora":
        from peft import get_peft_model

        from .lora import default_lora_config

        rank = 8 if stage_args.lora_rank is None else stage_args.lora_rank
        lora_config = default_lora_config(
            include_media_front_end=stage_args.lora_media_front_end,
            r=rank,
            lora_alpha=2 * rank,
        )
        model = get_peft_model(model, lora_config)
    eval_examples, callbacks = None, []
    if own_eval is not None:
        eval_examples = encode_conversations(processor, own_eval)
        if all(len(last_reply(row).split()) <= SHORT_REPLY_WORDS for row in own_eval):
            callbacks.append(ExactMatchCallback(processor, own_eval))
    trainer = build_stage_trainer(
        stage_args.stage, model, examples, training_args, callbacks, eval_examples, stage_args.packing_max_tokens
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    if stage_args.stage == "lora" and stage_args.merge:
        model = model.merge_and_unload()
    if trainer.is_world_process_zero():
        model.save_pretrained(training_args.output_dir)
        processor.save_pretrained(training_args.output_dir)
    return training_args.output_dir


def builtin_training_rows(stage_args: StageArguments, seed: int) -> Dataset:
    """The built-in data's training split; with `--edge_fraction`, mixed with the training split of its edge cases
    (`build_edge_cases`, a quarter as many images and clips, drawn from the same `--dataset_seed`)."""
    rows = build_multimodal_dataset(stage_args.num_images, stage_args.num_clips, seed=stage_args.dataset_seed)["train"]
    if stage_args.edge_fraction is None:
        return rows
    # build_edge_cases needs an image of each of its two kinds and a clip per split
    num_images, num_clips = max(stage_args.num_images // 4, 6), max(stage_args.num_clips // 4, 3)
    edge = build_edge_cases(num_images, num_clips, seed=stage_args.dataset_seed)["train"]
    mixed = mix_datasets(rows, edge, stage_args.edge_fraction, seed=seed)
    logger.warning(
        f"training on {len(rows)} rows of the built-in data and {len(mixed) - len(rows)} of its edge cases, drawn "
        f"from {len(edge)} (edge_fraction {stage_args.edge_fraction})"
    )
    return mixed


def _run_reinforcement(stage_args, training_args, model, processor, own, own_eval) -> str:
    """`--stage grpo` or `dpo` (TRL's trainers) on image questions: your own, or the built-in training split's seen
    question types."""
    from .rl import build_dpo_trainer, build_grpo_trainer, grpo_dataset, preference_pairs, seen_image_indices

    if own is None:
        rows = builtin_training_rows(stage_args, training_args.seed)
        own = load_conversations(rows.select(seen_image_indices(rows)))
    callbacks = []
    if own_eval is not None and all(len(last_reply(row).split()) <= SHORT_REPLY_WORDS for row in own_eval):
        callbacks.append(ExactMatchCallback(processor, own_eval))
    if stage_args.stage == "grpo":
        trainer = build_grpo_trainer(
            model,
            processor,
            grpo_dataset(own),
            training_args,
            eval_dataset=grpo_dataset(own_eval) if own_eval is not None else None,
            callbacks=callbacks,
        )
    else:
        reference, _ = load_saved_model(stage_args.model_name_or_path)
        trainer = build_dpo_trainer(
            model, processor, preference_pairs(model, processor, own), training_args, reference, callbacks
        )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    if trainer.is_world_process_zero():
        model.save_pretrained(training_args.output_dir)
        processor.save_pretrained(training_args.output_dir)
    return training_args.output_dir
