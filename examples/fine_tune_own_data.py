"""Fine-tune a saved model on your own data with `Trainer`, then ask it the held-out questions through `generate`.

    make demo                                              # saves the demo model to outputs/demo/model
    python examples/fine_tune_own_data.py --make-letters letters   # letters from the installed fonts (apt)
    python examples/fine_tune_own_data.py --base outputs/demo/model --dataset letters --steps 1000
    python examples/fine_tune_own_data.py --base outputs/demo/model --dataset my_data.jsonl --lora

`--dataset` is anything `deepseekv3.data.load_conversations` reads: a `save_to_disk` folder, a JSON lines file, an
image or audio folder with a `metadata.jsonl`, or a `load_dataset` name, with a `train` split and a held-out split
(`--eval-split`, default `test`). It prints the held-out exact match of greedy replies before and after training,
and saves the model (or the LoRA adapter) and the processor to `--output`.
"""

import argparse

from transformers import TrainingArguments

from deepseekv3.data import load_conversations
from deepseekv3.training.collators import encode_conversations
from deepseekv3.training.evaluation import exact_match, generate_conversation_replies
from deepseekv3.training.recipes import build_stage_trainer
from deepseekv3.training.run import load_saved_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--make-letters", help="write the letters data set (installed fonts) to this folder and stop")
    parser.add_argument("--base", default="outputs/demo/model", help="the saved model to start from")
    parser.add_argument("--dataset", help="your data: a save_to_disk folder, .jsonl, image/audio folder, ...")
    parser.add_argument("--eval-split", default="test")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--learning-rate", type=float, default=None, help="default 1e-3, or 3e-3 with --lora")
    parser.add_argument("--lora", action="store_true", help="train a LoRA adapter instead of every weight")
    parser.add_argument("--output", default="out/own_data")
    args = parser.parse_args()
    if args.make_letters:
        from deepseekv3.data.installed import build_letters_dataset

        build_letters_dataset({"train": 24, "validation": 4, "test": 4}).save_to_disk(args.make_letters)
        print(f"wrote {args.make_letters}")
        return
    if not args.dataset:
        parser.error("pass --dataset (or --make-letters FOLDER to write the letters data set first)")

    # read and checked before any model is built: a bad row is named here
    train = load_conversations(args.dataset, "train")
    held_out = load_conversations(args.dataset, args.eval_split)
    model, processor = load_saved_model(args.base)
    before = exact_match(held_out, generate_conversation_replies(model, processor, held_out))
    if args.lora:
        from peft import get_peft_model

        from deepseekv3.training.lora import default_lora_config

        model = get_peft_model(model, default_lora_config())
    training_args = TrainingArguments(
        output_dir=args.output,
        max_steps=args.steps,
        per_device_train_batch_size=32,
        learning_rate=args.learning_rate or (3e-3 if args.lora else 1e-3),
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.steps // 20),
        logging_steps=max(1, args.steps // 10),
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,  # the collator reads fields the forward does not take
    )
    examples = encode_conversations(processor, train)  # labels on the assistant turns only
    build_stage_trainer("lora" if args.lora else "instruct", model, examples, training_args).train()
    after = exact_match(held_out, generate_conversation_replies(model, processor, held_out))
    print(f"held-out exact match of greedy replies: {before:.3f} before, {after:.3f} after {args.steps} steps")
    model.save_pretrained(args.output)
    processor.save_pretrained(args.output)


if __name__ == "__main__":
    main()
