"""The stage recipes through the real Trainer: each stage trains its loss terms, logs them, and resumes exactly."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback, TrainingArguments

from deepseekv3.data import boxes_to_patch_weights, build_multimodal_dataset, build_text_corpus
from deepseekv3.tokenization import train_tokenizer
from deepseekv3.training.collators import (
    ContrastiveCollator,
    DistillationCollator,
    InstructionCollator,
    encode_rows,
)
from deepseekv3.training.demo import DemoSettings, build_demo_model
from deepseekv3.training.recipes import STAGES, build_stage_trainer, select_stage_examples

SETTINGS = DemoSettings(hidden_size=48, num_hidden_layers=2, num_images=48, num_clips=24)


@pytest.fixture(scope="module")
def encoded():
    torch.manual_seed(0)
    data = build_multimodal_dataset(SETTINGS.num_images, SETTINGS.num_clips, seed=0)
    tokenizer = train_tokenizer(build_text_corpus(SETTINGS.num_images, SETTINGS.num_clips, 0), vocab_size=320)
    model, processor = build_demo_model(tokenizer, SETTINGS)
    examples = encode_rows(processor, data["train"], model.config.patch_size, progress=False)
    return tokenizer, data["train"], examples


def fresh_model(tokenizer):
    torch.manual_seed(0)
    return build_demo_model(tokenizer, SETTINGS)[0]


def arguments(tmp_path, **overrides) -> TrainingArguments:
    defaults = {
        "output_dir": str(tmp_path),
        "max_steps": 3,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "remove_unused_columns": False,
        "seed": 0,
        "disable_tqdm": True,
    }
    return TrainingArguments(**{**defaults, **overrides})


def test_stage_rows(encoded):
    _, rows, examples = encoded
    chosen = {stage: select_stage_examples(stage, rows, examples) for stage in STAGES}
    assert len(chosen["contrastive"]) == len(rows)
    # stage 2 trains on every seen question; the image questions carry the distillation targets
    assert len(chosen["distill"]) == len(chosen["instruct"])
    assert all(("distillation_targets" in example) == ("pixel_values" in example) for example in chosen["distill"])
    assert any("input_features" in example for example in chosen["distill"])
    held_out = sum(rows["held_out"])
    assert 0 < held_out and len(chosen["lora"]) == held_out and len(chosen["instruct"]) == len(rows) - held_out
    with pytest.raises(ValueError, match="stage \\('pretrain'\\) must be one of"):
        select_stage_examples("pretrain", rows, examples)


@pytest.mark.parametrize(
    "stage, terms",
    [
        ("contrastive", {"contrastive_loss"}),
        ("distill", {"lm_loss", "distillation_loss"}),
        ("instruct", {"lm_loss"}),
    ],
)
def test_each_stage_trains_and_logs_its_loss_terms(encoded, tmp_path, stage, terms):
    tokenizer, rows, examples = encoded
    model = fresh_model(tokenizer)
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    trainer = build_stage_trainer(stage, model, select_stage_examples(stage, rows, examples), arguments(tmp_path))
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 3
    for entry in logged:
        assert (
            terms <= entry.keys() and not ({"lm_loss", "contrastive_loss", "distillation_loss"} - terms) & entry.keys()
        )
        assert entry["loss"] == pytest.approx(sum(entry[term] for term in terms), rel=1e-4)
    changed = {name for name, param in model.named_parameters() if not torch.equal(param, before[name])}
    assert "model.embed_tokens.weight" in changed
    if stage == "contrastive":
        assert {"model.logit_scale", "model.text_projection.weight", "model.image_projection.weight"} <= changed
        assert "lm_head.weight" not in changed


def test_contrastive_batches_pair_captions_with_media_images_first(encoded):
    tokenizer, rows, examples = encoded
    audio_first = sorted(examples[:8], key=lambda example: "pixel_values" in example)
    batch = ContrastiveCollator(fresh_model(tokenizer).config)(audio_first)
    images = [example for example in audio_first if "pixel_values" in example]
    assert batch["pixel_values"].shape[0] == len(images)
    first_caption = images[0]["caption_ids"]
    torch.testing.assert_close(batch["contrastive_input_ids"][0, : len(first_caption)], first_caption)
    assert batch["contrastive_input_ids"].shape[0] == batch["pixel_values"].shape[0] + batch["input_features"].shape[0]


def test_every_caption_and_conversation_starts_with_exactly_one_bos(encoded):
    tokenizer, rows, examples = encoded
    for example in examples[:16]:
        for ids in (example["caption_ids"].tolist(), example["input_ids"].tolist()):
            assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1


def test_distillation_targets_are_region_distributions_over_question_positions(encoded):
    tokenizer, rows, examples = encoded
    config = fresh_model(tokenizer).config
    image_examples = [
        example for example in select_stage_examples("distill", rows, examples) if "pixel_values" in example
    ]
    image_examples = image_examples[:6]
    batch = DistillationCollator(config)(image_examples)
    length = batch["input_ids"].shape[1]
    assert batch["distillation_targets"].shape == (6, length, 2, config.num_image_tokens)  # two groups of heads
    queries = batch["distillation_query_mask"]
    assert queries.any(dim=1).all()
    torch.testing.assert_close(batch["distillation_targets"][queries].sum(-1), torch.ones(int(queries.sum()), 2))
    assert not (queries & (batch["input_ids"] == config.image_token_id)).any()
    assert not (queries & (batch["labels"] != -100)).any()
    # audio questions batched with image questions: no distilled position; alone: a plain instruction batch
    audio_examples = [example for example in examples if "input_features" in example][:2]
    mixed = DistillationCollator(config)(image_examples[:2] + audio_examples)
    assert mixed["distillation_query_mask"][:2].any(dim=1).all() and not mixed["distillation_query_mask"][2:].any()
    assert not mixed["distillation_targets"][2:].any()
    torch.testing.assert_close(
        mixed["labels"], InstructionCollator(config)(image_examples[:2] + audio_examples)["labels"]
    )
    assert "distillation_targets" not in DistillationCollator(config)(audio_examples)


def test_each_object_word_targets_the_region_of_the_object_it_names(encoded):
    tokenizer, rows, examples = encoded
    patch_size = fresh_model(tokenizer).config.patch_size
    spatial = next(i for i in range(len(rows)) if rows[i]["question_template"] == "spatial")
    count = next(i for i in range(len(rows)) if rows[i]["question_template"] == "count")
    row, example = rows[spatial], examples[spatial]
    *naming, answer_position = example["distillation_query_mask"].nonzero().squeeze(-1).tolist()
    words = [tokenizer.decode(example["input_ids"][position]).strip() for position in naming]
    first, second = (row["objects"][index] for index in row["referred_objects"][::-1])  # [1, 0]: B then A
    assert words == [first["color"], first["shape"], second["color"], second["shape"]]
    # the position predicting the answer looks, with the first group of heads, at the object the answer is about
    # (B in "which side of A is B?") and with the second at the object it is located from (A); a naming word's
    # target is the same for both groups
    assert answer_position == example["prompt_length"] - 1

    def region(index):
        box = row["objects"][index]["box"]
        return torch.from_numpy(boxes_to_patch_weights([box], row["image_size"], patch_size).flatten())

    for position, index in zip(naming, (0, 0, 1, 1)):
        torch.testing.assert_close(example["distillation_targets"][position], torch.stack([region(index)] * 2))
    answer_targets = example["distillation_targets"][answer_position]
    torch.testing.assert_close(answer_targets, torch.stack([region(1), region(0)]))
    # "how many shapes are there?" names no object: every question position targets all the objects
    row, example = rows[count], examples[count]
    queries = example["distillation_query_mask"]
    assert int(queries.sum()) >= 6
    union = boxes_to_patch_weights([item["box"] for item in row["objects"]], row["image_size"], patch_size)
    torch.testing.assert_close(example["distillation_targets"][queries][0, 1], torch.from_numpy(union.flatten()))


class _Interrupt(TrainerCallback):
    """Stops the run the way a killed process would: right after the checkpoint of `step` is on disk."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def test_resuming_after_an_interruption_gives_the_uninterrupted_weights(encoded, tmp_path):
    tokenizer, rows, examples = encoded
    chosen = select_stage_examples("instruct", rows, examples)
    options = {"max_steps": 6, "save_strategy": "steps", "save_steps": 3, "learning_rate": 3e-3}

    uninterrupted = fresh_model(tokenizer)
    build_stage_trainer("instruct", uninterrupted, chosen, arguments(tmp_path / "straight", **options)).train()

    interrupted = fresh_model(tokenizer)
    args = arguments(tmp_path / "resumed", **options)
    trainer = build_stage_trainer("instruct", interrupted, chosen, args, callbacks=[_Interrupt(step=3)])
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert (tmp_path / "resumed" / "checkpoint-3").is_dir()

    resumed = fresh_model(tokenizer)
    trainer = build_stage_trainer("instruct", resumed, chosen, args)
    trainer.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-3"))
    assert trainer.state.global_step == 6
    for (name, expected), actual in zip(uninterrupted.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-5, msg=name)


def test_packed_batches_give_each_example_the_loss_it_has_padded(encoded):
    tokenizer, rows, examples = encoded
    model = fresh_model(tokenizer).eval()
    instruct = select_stage_examples("instruct", rows, examples)
    chosen = [e for e in instruct if "pixel_values" in e][:4] + [e for e in instruct if "input_features" in e][:3]
    padded = InstructionCollator(model.config)(chosen)
    packed = InstructionCollator(model.config, packing_max_tokens=model.config.max_position_embeddings)(chosen)
    assert packed["input_ids"].shape[0] < len(chosen) and "attention_mask" not in packed
    assert model.config.use_bidirectional_media_attention  # the demo model: patches see each other both ways
    with torch.no_grad():
        padded_loss, packed_loss = model(**padded).lm_loss, model(**packed).lm_loss
    torch.testing.assert_close(packed_loss, padded_loss, atol=1e-5, rtol=1e-5)


def test_train_command_runs_a_stage_and_saves_a_loadable_model(tmp_path):
    command = [
        sys.executable,
        "-m",
        "deepseekv3.cli",
        "train",
        "--stage",
        "instruct",
        "--output_dir",
        str(tmp_path / "out"),
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "4",
        "--num_images",
        "24",
        "--num_clips",
        "12",
        "--use_cpu",
        "--report_to",
        "none",
        "--disable_tqdm",
        "true",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.use_attention_gate and (tmp_path / "out" / "processor_config.json").exists()
    help_text = subprocess.run([*command[:4], "--help"], capture_output=True, text=True, timeout=120).stdout
    assert "--stage" in help_text and "--gradient_accumulation_steps" in help_text


def _train_command(output_dir, stage, *extra):
    return [
        sys.executable, "-m", "deepseekv3.cli", "train", "--stage", stage, "--output_dir", str(output_dir),
        "--max_steps", "2", "--per_device_train_batch_size", "4", "--num_images", "24", "--num_clips", "12",
        "--use_cpu", "--report_to", "none", "--disable_tqdm", "true", *extra,
    ]  # fmt: skip


def _run(command):
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


# peft 0.21.2 reads `model.is_gradient_checkpointing`, which transformers 5.24 deprecates; the warning is theirs.
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_lora_stage_saves_a_peft_adapter_that_gives_the_merged_models_logits(tmp_path):
    from peft import PeftModel

    base = tmp_path / "base"
    _run(_train_command(base, "instruct"))
    lora_options = ("--model_name_or_path", str(base), "--learning_rate", "1e-2", "--lora_media_front_end", "true")
    _run(_train_command(tmp_path / "adapter", "lora", *lora_options))
    _run(_train_command(tmp_path / "merged", "lora", *lora_options, "--merge", "true"))

    adapter_files = {path.name for path in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "processor_config.json"} <= adapter_files
    assert "model.safetensors" not in adapter_files  # the adapter, not a copy of the model
    targets = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["target_modules"]
    assert {"image_patch_embedding", "audio_frame_embedding", "o_proj"} <= set(targets)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    plain = AutoModelForCausalLM.from_pretrained(base).eval()
    input_ids = torch.tensor([[1, 5, 9, 14, 20, 33]])
    with torch.no_grad():
        adapted_logits, merged_logits = adapted(input_ids).logits, merged(input_ids).logits
        plain_logits = plain(input_ids).logits
    assert not torch.allclose(adapted_logits, plain_logits, atol=1e-4)  # the adapter changed something
    torch.testing.assert_close(adapted_logits, merged_logits, atol=1e-4, rtol=1e-4)


def _refused(command) -> str:
    """The stderr of a command that must fail."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0, result.stdout[-2000:]
    return result.stderr


def test_a_saved_model_trains_with_the_cpu_experts_kernel_the_demo_uses(encoded, tmp_path):
    from deepseekv3.training.run import load_saved_model

    tokenizer = encoded[0]
    model, processor = build_demo_model(tokenizer, SETTINGS)
    model.save_pretrained(tmp_path / "saved")
    processor.save_pretrained(tmp_path / "saved")
    loaded, _ = load_saved_model(str(tmp_path / "saved"))
    assert model.config._experts_implementation == "eager"
    assert loaded.config._experts_implementation == model.config._experts_implementation


def test_lora_stage_without_a_base_model_or_merge_is_refused_before_training(tmp_path):
    refused = _refused(_train_command(tmp_path / "out", "lora"))
    assert "--model_name_or_path" in refused and "--merge" in refused
    assert not (tmp_path / "out").exists()


def test_train_command_fine_tunes_on_your_own_json_lines(tmp_path):
    from PIL import Image

    (tmp_path / "pictures").mkdir()
    lines = []
    for index, (name, color) in enumerate([("red", (220, 30, 30)), ("blue", (30, 30, 220))] * 4):
        Image.new("RGB", (24, 24), color).save(tmp_path / "pictures" / f"{index}.png")
        lines.append(json.dumps({"question": "what colour is it?", "answer": name, "image": f"pictures/{index}.png"}))
    (tmp_path / "mine.jsonl").write_text("\n".join(lines))
    edge = [json.dumps({"question": "what colour is it?", "answer": "red", "image": "pictures/0.png"})] * 3
    (tmp_path / "edge.jsonl").write_text("\n".join(edge))

    evaluation = ("--eval_dataset", str(tmp_path / "mine.jsonl"), "--eval_strategy", "steps", "--eval_steps", "2")
    packed = ("--packing_max_tokens", "128")
    mixed = ("--edge_dataset", str(tmp_path / "edge.jsonl"), "--edge_fraction", "0.2")
    own = ("--dataset", str(tmp_path / "mine.jsonl"))
    result = _run(_train_command(tmp_path / "out", "instruct", *own, *evaluation, *packed, *mixed))
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.use_image_input
    # 8 rows of your own and round(8 * 0.2 / 0.8) = 2 edge cases
    assert "training on 8 rows of --dataset and 2 edge cases drawn from the 3 of --edge_dataset" in result.stderr
    assert "pass --dataset too" in _refused(_train_command(tmp_path / "never", "instruct", *mixed))
    # the evaluation loss, and the exact match of greedy replies (the references are one word)
    assert "'eval_loss'" in result.stdout + result.stderr
    assert "step 2: exact match of greedy replies" in result.stderr

    refused = _refused(_train_command(tmp_path / "never", "distill", "--dataset", str(tmp_path / "mine.jsonl")))
    assert "object boxes for distill" in refused
    assert "--stage contrastive batches whole rows" in _refused(
        _train_command(tmp_path / "never", "contrastive", *packed)
    )
    lines[3] = json.dumps({"question": "what colour is it?", "answer": "red", "image": "pictures/missing.png"})
    (tmp_path / "bad.jsonl").write_text("\n".join(lines))
    bad = _refused(_train_command(tmp_path / "never", "instruct", "--dataset", str(tmp_path / "bad.jsonl")))
    assert "row 3: the image 'pictures/missing.png' could not be read" in bad
    assert not (tmp_path / "never").exists()


def test_edge_fraction_mixes_the_builtin_edge_cases_into_the_builtin_data():
    from deepseekv3.training.run import builtin_training_rows, parse_train_arguments

    stage_args, _ = parse_train_arguments(
        ["--stage", "instruct", "--num_images", "200", "--num_clips", "60", "--edge_fraction", "0.2"]
        + ["--output_dir", "unused", "--use_cpu"]
    )
    mixed = builtin_training_rows(stage_args, seed=0)
    stage_args.edge_fraction = None
    core = builtin_training_rows(stage_args, seed=0)
    core_keys = {(row["modality"], repr(row["objects"]), repr(row["tones"])) for row in core}
    mixed_keys = [(row["modality"], repr(row["objects"]), repr(row["tones"])) for row in mixed]
    # every core row once, and round(len(core) * 0.2 / 0.8) rows that are no core row: the edge cases
    assert core_keys <= set(mixed_keys)
    edge = [key for key in mixed_keys if key not in core_keys]
    assert len(edge) == round(len(core) * 0.2 / 0.8) == len(mixed) - len(core)
    assert any(modality == "audio" for modality, _, _ in edge) and any(modality == "image" for modality, _, _ in edge)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--stage", "instruct", "--lora_rank", "4"], "--lora_rank: options of --stage lora"),
        (["--stage", "contrastive", "--merge", "true"], "--merge: options of --stage lora"),
        (["--stage", "instruct", "--dataset", "mine.jsonl", "--edge_fraction", "0.3"], "pass --edge_dataset too"),
    ],
)
def test_an_option_the_stage_does_not_read_is_refused_not_ignored(tmp_path, options, message):
    from deepseekv3.training.run import parse_train_arguments, run_training

    with pytest.raises(ValueError, match=message):
        run_training(*parse_train_arguments([*options, "--output_dir", str(tmp_path / "out"), "--use_cpu"]))
    assert not (tmp_path / "out").exists()
