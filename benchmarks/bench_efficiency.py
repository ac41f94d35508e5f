"""Efficient inference: gated head skipping, INT8 (PTQ and QAT), blockwise long-context attention, MLA cache size.

Command (from the repository root):

    .venv/bin/python benchmarks/bench_efficiency.py            # CPU; trains and caches the demo model on first run
    .venv/bin/python benchmarks/bench_efficiency.py --retrain  # train the cached models again
    .venv/bin/python benchmarks/bench_efficiency.py --compile-int8  # + compiled INT8 variants (README figures)
    .venv/bin/python benchmarks/bench_efficiency.py --parts int8 --output /tmp/int8.json  # only part (b)

The demo model (`deepseekv3.training.demo.build_demo_model`: hidden 96, 3 layers of 4 heads, MoE, head gates,
images and audio) is trained by the instruction stage recipe (`build_stage_trainer("instruct", ...)`) for
`--train-steps` steps with the gate-sparsity penalty (`attention_gate_sparsity_weight = --gate-penalty`), saving a
`Trainer` checkpoint `--qat-steps` steps before the end. QAT (`deepseekv3.quantization.train_qat`) resumes that
checkpoint fake-quantized: the same run's last `--qat-steps` steps (optimizer state, learning-rate schedule and data
order continued) are trained again with fake quantization, so QAT and fp32 differ by fake quantization alone.
(Fine-tuning the finished model again, 40 steps of a fresh optimizer and schedule at a learning rate of 3e-5 or 3e-4,
moved its accuracy by -4.6 to +1.0 points with the data order, with or without fake quantization.) Both are cached
under `--cache-dir` (the first run trains: 15 minutes on 2 busy CPU cores; later runs take about 7 minutes, the
compiled variants of `--compile-int8` included; the INT8 part alone, 2.5 minutes on one core). `--parts` runs some
of (a), (b), (c).

(a) Head skipping at `--skip-lengths` tokens (4k and 16k): one row made of test conversations (text, images and
    audio) back to back, sdpa attention. A reference pass records every head's largest gate over the row; the
    thresholds sit between consecutive sorted maxima so that 3, 5 and 6 of the 12 heads (25%, 41.7% >= 37%, 50%)
    are skipped. For each: attention FLOPs (`FlopCounterMode`, the `self_attn` modules), interleaved forward times
    (the `_harness` rounds; attention time from hooks around the `self_attn` modules), and the cosine similarity of
    the final hidden states to the unskipped model (per token; mean and minimum).
(b) fp32 vs INT8 PTQ (`load_int8_model`: transformers' `TorchAoConfig`) vs QAT (prepared, trained, converted):
    forward latency of 16 test conversations on CPU (interleaved rounds) and accuracy (closed-set scoring,
    `deepseekv3.training.evaluation`) on a fresh draw of the data (seed + 1, `--eval-images` and `--eval-clips`,
    every row but the held-out task's: 5,200 rows by default, against the 520 of the test split), with the paired
    standard error of each difference to fp32. Also the same latency for a 2-layer dense model at hidden 1024
    (random weights), where the matmuls are large enough for int8 kernels to pay.
(c) Peak memory of one forward (no grad) against context length, one fresh process per variant
    (`MALLOC_MMAP_THRESHOLD_=65536`, the kernel's RSS high-water mark reset before each length, as `_harness` does):
    dense causal sdpa, blockwise (block 512, 4 sink tokens) through flex attention and through sdpa, and dense
    eager, on a 1-layer model of the demo's attention sizes. Also the MLA cache per token against a multi-head
    cache of the same heads, measured from the cache tensors and computed for DeepSeek-V3's config, and the
    DeepSeek-V2 paper's 93.3% (against DeepSeek 67B) recomputed.

Writes `benchmarks/results/bench_efficiency.json` (machine, versions, every figure, `headline`).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _harness import MEMORY_WORKER_ENV, kept_rounds, machine_info, time_variants
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop
from transformers import AutoModelForCausalLM, AutoProcessor, set_seed

from deepseekv3 import DeepseekV3MultimodalConfig, DeepseekV3MultimodalForConditionalGeneration
from deepseekv3.data import build_multimodal_dataset, build_text_corpus, split_held_out
from deepseekv3.quantization import load_int8_model, train_qat
from deepseekv3.tokenization import train_tokenizer
from deepseekv3.training.collators import InstructionCollator, encode_rows
from deepseekv3.training.demo import DemoSettings, build_demo_model, stage_training_arguments
from deepseekv3.training.evaluation import predict_answers
from deepseekv3.training.recipes import build_stage_trainer, select_stage_examples

ROOT = Path(__file__).resolve().parents[1]
RESULTS_PATH = ROOT / "benchmarks" / "results" / "bench_efficiency.json"
OFFICIAL_CONFIG = ROOT / "tests" / "fixtures" / "deepseek-v3-config.json"
PARTS = ("head_skipping", "int8", "memory")
SKIP_FRACTIONS = {"skip_25": 3, "skip_37": 5, "skip_50": 6}  # heads skipped of 12
MEMORY_VARIANTS = {  # variant: (attention implementation, blockwise, longest context it runs)
    "dense_sdpa": ("sdpa", False, None),
    "blockwise_flex": ("flex_attention", True, None),
    "blockwise_sdpa": ("sdpa", True, 8192),  # its (seq, seq) boolean mask is quadratic
    "dense_eager": ("eager", False, 4096),  # materialises (heads, seq, seq) fp32 scores
}
BLOCK_SIZE, NUM_SINK_TOKENS = 512, 4

# torch's FLOP counter knows the CUDA sdpa kernels but not the CPU flash kernel that sdpa runs here; count it the way
# torch counts every sdpa kernel (the whole query x key rectangle: the causal half is not subtracted)
register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu, get_raw=True)(sdpa_flop)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", type=Path, default=ROOT / "outputs" / "bench_efficiency")
    parser.add_argument("--retrain", action="store_true", help="train the cached models again")
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--qat-steps", type=int, default=40, help="last steps of the training run redone with QAT")
    parser.add_argument("--gate-penalty", type=float, default=0.1, help="attention_gate_sparsity_weight")
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--num-clips", type=int, default=500)
    parser.add_argument("--eval-images", type=int, default=4000, help="images of the INT8 accuracy data")
    parser.add_argument("--eval-clips", type=int, default=2000, help="clips of the INT8 accuracy data")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--skip-lengths", default="4096,16384")
    parser.add_argument("--memory-lengths", default="1024,2048,4096,8192,16384,32768")
    parser.add_argument("--repeats", type=int, default=5, help="clean timed rounds per comparison")
    parser.add_argument("--budget-s", type=float, default=60.0, help="time budget of one comparison's rounds")
    parser.add_argument(
        "--compile-int8",
        action="store_true",
        help="add hidden-1024 variants whose linear layers are compiled (inductor fuses torchao's int8 matmuls)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS_PATH)
    parser.add_argument("--memory-worker", choices=list(MEMORY_VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not 0 < args.qat_steps < args.train_steps:
        parser.error(f"--qat-steps ({args.qat_steps}) must be between 0 and --train-steps ({args.train_steps})")
    if not set(args.parts.split(",")) <= set(PARTS):
        parser.error(f"--parts ({args.parts}) must name some of {', '.join(PARTS)}")
    return args


# --- the demo model, trained with the gate penalty, and its QAT copy ---------------------------------------------


def demo_settings(args: argparse.Namespace) -> DemoSettings:
    return DemoSettings(
        output_dir=str(args.cache_dir),
        num_images=args.num_images,
        num_clips=args.num_clips,
        stage_steps={"instruct": args.train_steps},
    )


def demo_data(settings: DemoSettings):
    data = build_multimodal_dataset(
        settings.num_images, settings.num_clips, seed=settings.seed, image_size=settings.image_size
    )
    seen, _ = split_held_out(data)
    return data["train"], seen["test"]


def accuracy_rows(settings: DemoSettings, args: argparse.Namespace):
    """The INT8 accuracy data: a draw of the generator the model never trained on, every row but the held-out task's
    (the test split of the training data is too small to resolve a point: see the module docstring)."""
    data = build_multimodal_dataset(
        args.eval_images,
        args.eval_clips,
        seed=settings.seed + 1,
        image_size=settings.image_size,
        split_sizes={"test": 1.0},
    )
    seen, _ = split_held_out(data)
    return seen["test"]


def train_models(args: argparse.Namespace) -> dict:
    """Train the gate-penalised demo model, and its last `--qat-steps` steps again with QAT, into the cache; returns
    the training record."""
    settings = demo_settings(args)
    started = time.perf_counter()
    set_seed(settings.seed)
    corpus = build_text_corpus(settings.num_images, settings.num_clips, settings.seed)
    tokenizer = train_tokenizer(corpus, vocab_size=settings.vocab_size)
    train_rows, _ = demo_data(settings)
    model, processor = build_demo_model(tokenizer, settings)
    model.config.attention_gate_sparsity_weight = args.gate_penalty
    examples = encode_rows(processor, train_rows, model.config.patch_size, progress=False)
    examples = select_stage_examples("instruct", train_rows, examples)
    training = stage_training_arguments(settings, "instruct", args.cache_dir, args.train_steps)
    qat_from_step = args.train_steps - args.qat_steps
    training.set_save(strategy="steps", steps=qat_from_step)  # Trainer also saves at the end
    trainer = build_stage_trainer("instruct", model, examples, training)
    trainer.train()
    model.save_pretrained(args.cache_dir / "fp32")
    processor.save_pretrained(args.cache_dir / "fp32")
    fp32_seconds = time.perf_counter() - started

    # QAT: the same run from its checkpoint at `qat_from_step`, fake-quantized (same arguments, no checkpoints)
    checkpoint = Path(training.output_dir) / f"checkpoint-{qat_from_step}"
    qat_model = AutoModelForCausalLM.from_pretrained(checkpoint)
    qat_model.set_experts_implementation("eager")
    qat_training = stage_training_arguments(settings, "instruct", args.cache_dir / "qat", args.train_steps)
    qat_int8 = train_qat(
        qat_model, examples, qat_training, args.cache_dir / "qat_trained", resume_from_checkpoint=checkpoint
    )
    qat_int8.save_pretrained(args.cache_dir / "qat_int8")
    record = {
        "train_steps": args.train_steps,
        "qat_steps": args.qat_steps,
        "gate_penalty": args.gate_penalty,
        "batch_size": settings.batch_size,
        "learning_rate": settings.learning_rate,
        "num_images": settings.num_images,
        "num_clips": settings.num_clips,
        "fp32_train_seconds": round(fp32_seconds, 1),
        "total_train_seconds": round(time.perf_counter() - started, 1),
        "log_history": [entry for entry in trainer.state.log_history if "loss" in entry],
    }
    (args.cache_dir / "training.json").write_text(json.dumps(record, indent=2))
    return record


def load_models(args: argparse.Namespace) -> tuple[dict, object, dict]:
    """The fp32, PTQ and QAT models (training them first when the cache lacks them), processor, training record."""
    if args.retrain or not (args.cache_dir / "training.json").is_file():
        print(f"Training the demo model ({args.train_steps} steps), its last {args.qat_steps} steps again with QAT")
        train_models(args)
    record = json.loads((args.cache_dir / "training.json").read_text())
    processor = AutoProcessor.from_pretrained(args.cache_dir / "fp32")
    models = {
        "fp32": AutoModelForCausalLM.from_pretrained(args.cache_dir / "fp32"),
        "int8_ptq": load_int8_model(args.cache_dir / "fp32"),
        "int8_qat": AutoModelForCausalLM.from_pretrained(args.cache_dir / "qat_int8"),
    }
    for model in models.values():
        model.eval()
        model.set_experts_implementation("eager")  # the demo's CPU choice (measured faster at these sizes)
    return models, processor, record


# --- (a) head skipping -------------------------------------------------------------------------------------------


def long_row(examples: list[dict], length: int) -> dict[str, torch.Tensor]:
    """Test conversations back to back in one row of at most `length` tokens, with their images and clips."""
    chosen, total = [], 0
    for example in examples * (1 + length // sum(len(e["input_ids"]) for e in examples)):
        if total + len(example["input_ids"]) > length:
            break
        chosen.append(example)
        total += len(example["input_ids"])
    batch = {
        "input_ids": torch.cat([e["input_ids"] for e in chosen])[None],
        "mm_token_type_ids": torch.cat([e["mm_token_type_ids"] for e in chosen])[None],
        "pixel_values": torch.cat([e["pixel_values"] for e in chosen if "pixel_values" in e]),
    }
    clips = [e for e in chosen if "input_features" in e]
    frames = max(e["input_features"].shape[-1] for e in clips)
    batch["input_features"] = torch.cat(
        [F.pad(e["input_features"], (0, frames - e["input_features"].shape[-1])) for e in clips]
    )
    batch["input_features_mask"] = torch.cat(
        [F.pad(e["input_features_mask"], (0, frames - e["input_features_mask"].shape[-1])) for e in clips]
    )
    return batch


def attention_flops(model, batch) -> tuple[int, torch.Tensor, list[torch.Tensor] | None]:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        outputs = model.model(**batch, use_cache=False, output_gate_values=True)
    per_module = counter.get_flop_counts()
    flops = sum(sum(ops.values()) for name, ops in per_module.items() if name.endswith("self_attn"))
    return flops, outputs.last_hidden_state[0], outputs.gate_values


def skip_thresholds(gate_values: tuple[torch.Tensor, ...]) -> dict[str, float]:
    """Thresholds between consecutive sorted per-head gate maxima: each skips exactly its number of heads."""
    maxima = torch.stack([layer[0].amax(dim=0) for layer in gate_values]).flatten().sort().values
    return {name: float((maxima[count - 1] + maxima[count]) / 2) for name, count in SKIP_FRACTIONS.items()}


def capture_attention_inputs(model, batch) -> list[tuple]:
    """Each `self_attn` module with the arguments it got in one forward pass (to time attention alone)."""
    captured, handles = [], []
    for name, module in model.named_modules():
        if name.endswith("self_attn"):
            hook = module.register_forward_pre_hook(
                lambda m, args, kwargs: captured.append((m, args, kwargs)), with_kwargs=True
            )
            handles.append(hook)
    with torch.no_grad():
        model.model(**batch, use_cache=False)
    for handle in handles:
        handle.remove()
    return captured


def bench_head_skipping(model, examples, length: int, args) -> dict:
    model.config.max_position_embeddings = max(model.config.max_position_embeddings, length)
    batch = long_row(examples, length)
    tokens = batch["input_ids"].shape[1]
    num_heads = model.config.num_attention_heads
    model.set_head_skip_threshold(0.0)
    full_flops, reference, gate_values = attention_flops(model, batch)
    thresholds = skip_thresholds(gate_values)
    figures = {"tokens": tokens, "all_heads": {"attention_flops": full_flops, "threshold": 0.0}}
    for name, threshold in thresholds.items():
        model.set_head_skip_threshold(threshold)
        flops, hidden, _ = attention_flops(model, batch)
        cosine = F.cosine_similarity(hidden.float(), reference.float(), dim=-1)
        skipped = model.get_skipped_heads()
        figures[name] = {
            "threshold": threshold,
            "skipped_heads": skipped,
            "heads_skipped_fraction": sum(map(len, skipped.values())) / (len(skipped) * num_heads),
            "attention_flops": flops,
            "attention_compute_saved": 1 - flops / full_flops,
            "cosine_mean": float(cosine.mean()),
            "cosine_min": float(cosine.min()),
        }

    # attention time: every layer's attention on the inputs it got in the unskipped forward pass
    model.set_head_skip_threshold(0.0)
    attention_calls = capture_attention_inputs(model, batch)

    def make_step(name):
        def step() -> float:
            model.set_head_skip_threshold(figures[name]["threshold"])
            with torch.no_grad():
                for module, call_args, call_kwargs in attention_calls:
                    module(*call_args, **call_kwargs)
            return 0.0

        return step

    variants = ("all_heads", *thresholds)
    repeats = args.repeats if tokens <= 8192 else min(args.repeats, 2)
    print(f"  head skipping at {tokens} tokens: timing the attention of {', '.join(variants)} ({repeats} rounds)")
    steps = {name: make_step(name) for name in variants}
    rounds, _ = time_variants(steps, variants, repeats, args.budget_s, "cpu", time.perf_counter())
    kept = kept_rounds(rounds)
    for name in variants:
        figures[name]["attention_ms"] = statistics.median(r["times"][name] for r in kept) * 1000
    for name in thresholds:
        figures[name]["attention_time_ratio"] = figures[name]["attention_ms"] / figures["all_heads"]["attention_ms"]
    figures["rounds_kept"] = len(kept)
    figures["only_clean_rounds_kept"] = all(r["clean"] for r in kept)
    model.set_head_skip_threshold(0.0)
    return figures


# --- (b) INT8 ----------------------------------------------------------------------------------------------------


def correct_answers(model, processor, rows, examples) -> torch.Tensor:
    """1.0 where the model's answer to a row is right, else 0.0, `(len(rows),)`."""
    predictions = predict_answers(model, processor, rows, examples, progress=False)
    return torch.tensor([float(prediction == rows[index]["answer"]) for index, prediction in enumerate(predictions)])


def accuracy_difference(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    """`other`'s accuracy minus `reference`'s on the same rows, in points, with the paired standard error (both
    models answer every row, so only the rows where they disagree add noise)."""
    difference = other - reference
    return {
        "points": 100 * float(difference.mean()),
        "standard_error_points": 100 * float(difference.std() / len(difference) ** 0.5),
    }


def time_forwards(models: dict, batch: dict, args) -> dict:
    def make_step(model):
        def step() -> float:
            with torch.no_grad():
                model(**batch)
            return 0.0

        return step

    variants = tuple(models)
    steps = {name: make_step(model) for name, model in models.items()}
    rounds, _ = time_variants(steps, variants, args.repeats, args.budget_s, "cpu", time.perf_counter())
    kept = kept_rounds(rounds)
    medians = {name: statistics.median(r["times"][name] for r in kept) for name in variants}
    first = variants[0]
    return {
        name: {
            "median_ms": medians[name] * 1000,
            "speedup": medians[first] / medians[name],
            "rounds_kept": len(kept),
            "only_clean_rounds_kept": all(r["clean"] for r in kept),
        }
        for name in variants
    }


def quantized_linear_share(fp32_model, int8_model, batch: dict, repeats: int = 20) -> dict:
    """Share of the fp32 forward spent in the linear layers that PTQ quantizes (timed with forward hooks), and the
    speed-up int8 could give at best if those layers took no time at all (Amdahl's bound)."""
    quantized = {
        name
        for name, module in int8_model.named_modules()
        if isinstance(module, torch.nn.Linear) and type(module.weight.data) is not torch.Tensor
    }
    spent, started = [0.0], {}

    def before(module, args):
        started[module] = time.perf_counter()

    def after(module, args, output):
        spent[0] += time.perf_counter() - started[module]

    hooks = [
        hook
        for name, module in fp32_model.named_modules()
        if name in quantized
        for hook in (module.register_forward_pre_hook(before), module.register_forward_hook(after))
    ]
    with torch.no_grad():
        fp32_model(**batch)  # warm-up
        spent[0] = 0.0
        start = time.perf_counter()
        for _ in range(repeats):
            fp32_model(**batch)
        total = time.perf_counter() - start
    for hook in hooks:
        hook.remove()
    share = spent[0] / total
    return {"quantized_linears": len(quantized), "share_of_forward": share, "speedup_bound": 1 / (1 - share)}


def compile_linear_layers(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.compile()
    return model


def bench_int8(models: dict, processor, examples, accuracy_data, args) -> dict:
    batch = InstructionCollator(models["fp32"].config)(examples[:16])
    batch.pop("labels")
    print(f"  INT8 latency: batch {tuple(batch['input_ids'].shape)}")
    figures = {"demo_batch": list(batch["input_ids"].shape), "demo": time_forwards(models, batch, args)}
    figures["demo_quantized_linear_share"] = quantized_linear_share(models["fp32"], models["int8_ptq"], batch)
    rows, accuracy_examples = accuracy_data
    print(f"  INT8 accuracy: {len(rows)} rows")
    figures["accuracy_rows"] = len(rows)
    correct = {name: correct_answers(model, processor, rows, accuracy_examples) for name, model in models.items()}
    # QAT's fake-quantized weights before conversion: how much of its difference to fp32 is conversion
    qat_fp32 = AutoModelForCausalLM.from_pretrained(args.cache_dir / "qat_trained").eval()
    qat_fp32.set_experts_implementation("eager")
    qat_fp32_correct = correct_answers(qat_fp32, processor, rows, accuracy_examples)
    for name in models:
        difference = accuracy_difference(correct["fp32"], correct[name])
        figures["demo"][name]["accuracy"] = float(correct[name].mean())
        figures["demo"][name]["accuracy_loss_points"] = -difference["points"]
        figures["demo"][name]["accuracy_loss_standard_error_points"] = difference["standard_error_points"]
    qat = figures["demo"]["int8_qat"]
    qat["fp32_weights_accuracy"] = float(qat_fp32_correct.mean())
    qat["conversion_loss_points"] = -accuracy_difference(qat_fp32_correct, correct["int8_qat"])["points"]

    # where int8 kernels pay: a dense model with 1024-wide matmuls (random weights; latency only)
    config = DeepseekV3MultimodalConfig(
        vocab_size=4096, hidden_size=1024, intermediate_size=4096, num_hidden_layers=2, first_k_dense_replace=2,
        num_attention_heads=8, num_key_value_heads=8, q_lora_rank=512, kv_lora_rank=256, qk_rope_head_dim=32,
        qk_nope_head_dim=64, v_head_dim=64, n_routed_experts=8, n_group=1, topk_group=1, num_experts_per_tok=2,
        use_attention_gate=True, max_position_embeddings=1024,
    )  # fmt: skip
    torch.manual_seed(0)
    large = DeepseekV3MultimodalForConditionalGeneration(config).eval()
    large.save_pretrained(args.cache_dir / "large_fp32")
    large_models = {"fp32": large, "int8_ptq": load_int8_model(args.cache_dir / "large_fp32").eval()}
    if args.compile_int8:
        # torchao's dynamic int8 matmul (quantize the activation, int8 matmul, rescale) is fused by inductor; in
        # eager mode on CPU its separate steps are slower than the fp32 matmul
        large_models["fp32_compiled"] = compile_linear_layers(
            AutoModelForCausalLM.from_pretrained(args.cache_dir / "large_fp32").eval()
        )
        large_models["int8_ptq_compiled"] = compile_linear_layers(
            load_int8_model(args.cache_dir / "large_fp32").eval()
        )
    input_ids = torch.randint(5, config.vocab_size, (8, 128))
    print("  INT8 latency: hidden-1024 dense model, batch (8, 128)")
    figures["hidden_1024"] = time_forwards(large_models, {"input_ids": input_ids}, args)
    return figures


# --- (c) long-context memory, MLA cache ---------------------------------------------------------------------------


def memory_model_config(variant: str, max_length: int) -> DeepseekV3MultimodalConfig:
    _, blockwise, _ = MEMORY_VARIANTS[variant]
    return DeepseekV3MultimodalConfig(
        vocab_size=384, hidden_size=96, intermediate_size=192, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16,
        v_head_dim=16, n_routed_experts=8, n_group=2, topk_group=2, num_experts_per_tok=2, moe_intermediate_size=48,
        use_attention_gate=True, attention_gate_ratio=4, max_position_embeddings=max_length,
        attention_block_size=BLOCK_SIZE if blockwise else None,
        attention_num_sink_tokens=NUM_SINK_TOKENS if blockwise else 0,
    )  # fmt: skip


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_worker(variant: str, lengths: list[int]) -> None:
    """Runs in a fresh process: one forward per length (a warm-up first for flex, which compiles per shape);
    prints `{length: {"forward_peak_mb", "seconds"}}` as one JSON line."""
    implementation, _, longest = MEMORY_VARIANTS[variant]
    torch.manual_seed(0)
    model = DeepseekV3MultimodalForConditionalGeneration(memory_model_config(variant, max(lengths))).eval()
    model.set_attn_implementation(implementation)
    figures = {}
    for length in lengths:
        if longest is not None and length > longest:
            continue
        input_ids = torch.randint(5, 384, (1, length))
        with torch.no_grad():
            if implementation == "flex_attention":
                model.model(input_ids=input_ids, use_cache=False)
            before = _rss_mib("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            start = time.perf_counter()
            model.model(input_ids=input_ids, use_cache=False)
            seconds = time.perf_counter() - start
        figures[length] = {"forward_peak_mb": _rss_mib("VmHWM") - before, "seconds": seconds}
    print(json.dumps(figures))


def bench_memory(args) -> dict:
    figures = {}
    for variant in MEMORY_VARIANTS:
        print(f"  peak memory: {variant}")
        command = [sys.executable, str(Path(__file__).resolve()), "--memory-worker", variant]
        command += ["--memory-lengths", args.memory_lengths]
        done = subprocess.run(
            command, env={**os.environ, **MEMORY_WORKER_ENV}, capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"memory worker {variant} failed:\n{done.stderr[-3000:]}")
        figures[variant] = {int(k): v for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}
    return figures


def cache_bytes_per_token(config, bytes_per_element: float = 4) -> dict:
    """MLA caches one latent (`kv_lora_rank`) and one rotary key (`qk_rope_head_dim`) per layer and token, plus the
    patch row and column with `use_image_position_values`; the equivalent multi-head cache holds every head's key
    (`qk_head_dim`) and value (`v_head_dim`)."""
    layers = config["num_hidden_layers"]
    coordinates = 2 if config.get("use_image_position_values") else 0
    mla = layers * (config["kv_lora_rank"] + config["qk_rope_head_dim"] + coordinates) * bytes_per_element
    qk_head_dim = config["qk_nope_head_dim"] + config["qk_rope_head_dim"]
    mha = layers * config["num_attention_heads"] * (qk_head_dim + config["v_head_dim"]) * bytes_per_element
    return {"mla_bytes": mla, "mha_bytes": mha, "reduction": 1 - mla / mha}


def bench_cache(model) -> dict:
    config = model.config
    input_ids = torch.randint(5, config.vocab_size, (1, 64))
    with torch.no_grad():
        cache = model(input_ids=input_ids, use_cache=True).cache
    measured = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers) / input_ids.shape[1]
    demo = cache_bytes_per_token(config.to_dict())
    official = json.loads(OFFICIAL_CONFIG.read_text())
    # DeepSeek-V2 paper (Table 1, section 3.2.3) against DeepSeek 67B: V2 has 60 layers of MLA with a 512 latent
    # and a 64-wide rotary key; 67B has 95 layers of GQA with 8 KV heads of 128 (DeepSeek LLM paper), cached in
    # bf16; deployed V2 quantizes its KV cache to about 6 bits per element
    v2_elements, llm67b_elements = 60 * (512 + 64), 95 * 2 * 8 * 128
    return {
        "demo_measured_bytes_per_token": measured,
        "demo": demo,
        "deepseek_v3_bf16": cache_bytes_per_token(official, bytes_per_element=2),
        "deepseek_v2_vs_67b": {
            "v2_elements": v2_elements,
            "67b_elements": llm67b_elements,
            "reduction_elements": 1 - v2_elements / llm67b_elements,
            "reduction_v2_6bit_vs_67b_bf16": 1 - (v2_elements * 6 / 8) / (llm67b_elements * 2),
            "paper": 0.933,
        },
    }


# --- report --------------------------------------------------------------------------------------------------------


def print_head_skipping(result: dict) -> None:
    for figures in result["head_skipping"].values():
        print(
            f"\n(a) head skipping, {figures['tokens']} tokens (sdpa, CPU; medians of {figures['rounds_kept']} rounds)"
        )
        print(
            f"{'variant':<10} {'skipped':>7} {'attn GFLOP':>10} {'saved':>6} {'attn ms':>8} {'time x':>6} "
            f"{'cos mean':>8} {'cos min':>8}"
        )
        for name in ("all_heads", *SKIP_FRACTIONS):
            row = figures[name]
            print(
                f"{name:<10} {row.get('heads_skipped_fraction', 0):>7.1%} {row['attention_flops'] / 1e9:>10.2f} "
                f"{row.get('attention_compute_saved', 0):>6.1%} {row['attention_ms']:>8.0f} "
                f"{row.get('attention_time_ratio', 1):>6.3f} "
                f"{row.get('cosine_mean', 1):>8.4f} {row.get('cosine_min', 1):>8.4f}"
            )


def print_int8(result: dict) -> None:
    int8 = result["int8"]
    print(
        f"\n(b) INT8, demo model, batch {int8['demo_batch']}: latency (CPU); accuracy on {int8['accuracy_rows']} rows "
        "(paired standard error)"
    )
    for name, row in int8["demo"].items():
        print(
            f"{name:<9} {row['median_ms']:>8.1f} ms  x{row['speedup']:.2f}  accuracy {row['accuracy']:.4f} "
            f"({-row['accuracy_loss_points']:+.2f} +- {row['accuracy_loss_standard_error_points']:.2f} points)"
        )
    qat = int8["demo"]["int8_qat"]
    print(
        f"QAT's fp32 weights before conversion: accuracy {qat['fp32_weights_accuracy']:.4f}; int8 conversion loss "
        f"{qat['conversion_loss_points']:.2f} points"
    )
    share = int8["demo_quantized_linear_share"]
    print(
        f"the {share['quantized_linears']} linear layers PTQ quantizes take {share['share_of_forward']:.1%} of the "
        f"fp32 forward: int8 could be at most x{share['speedup_bound']:.2f} faster on the demo model"
    )
    for name, row in int8["hidden_1024"].items():
        print(f"hidden-1024 {name:<9} {row['median_ms']:>8.1f} ms  x{row['speedup']:.2f}")


def print_memory(result: dict) -> None:
    print("\n(c) forward peak memory (MB) / time (s) against context length")
    lengths = sorted({length for figures in result["memory"].values() for length in figures})
    print(f"{'variant':<15}" + "".join(f"{length:>14}" for length in lengths))
    for variant, figures in result["memory"].items():
        cells = [
            f"{figures[length]['forward_peak_mb']:>7.0f}/{figures[length]['seconds']:>5.1f}"
            if length in figures
            else "-"
            for length in lengths
        ]
        print(f"{variant:<15}" + "".join(f"{cell:>14}" for cell in cells))
    cache = result["mla_cache"]
    demo, v3, v2 = cache["demo"], cache["deepseek_v3_bf16"], cache["deepseek_v2_vs_67b"]
    print(
        f"\nMLA cache/token: demo {demo['mla_bytes']:.0f} B (measured {cache['demo_measured_bytes_per_token']:.0f})"
        f" vs MHA {demo['mha_bytes']:.0f} B ({demo['reduction']:.1%} less); DeepSeek-V3 bf16 {v3['mla_bytes']:.0f} vs "
        f"{v3['mha_bytes']:.0f} B ({v3['reduction']:.1%} less); V2 vs 67B: {v2['reduction_elements']:.1%} in "
        f"elements, {v2['reduction_v2_6bit_vs_67b_bf16']:.1%} with the 6-bit V2 cache (paper: 93.3%)"
    )


def head_skipping_headline(result: dict) -> list[tuple]:
    longest = result["head_skipping"][max(result["head_skipping"], key=int)]["skip_37"]
    return [
        ("attention_compute_saved_skip_37_longest", longest["attention_compute_saved"], 0.37, True),
        ("final_hidden_cosine_skip_37_longest", longest["cosine_mean"], 0.98, True),
    ]


def int8_headline(result: dict) -> list[tuple]:
    int8 = result["int8"]["demo"]
    figures = [
        ("int8_ptq_cpu_speedup_demo", int8["int8_ptq"]["speedup"], 1.5, True),
        ("int8_qat_cpu_speedup_demo", int8["int8_qat"]["speedup"], 1.5, True),
        ("int8_ptq_cpu_speedup_hidden_1024", result["int8"]["hidden_1024"]["int8_ptq"]["speedup"], 1.5, True),
        ("int8_qat_accuracy_loss_points", int8["int8_qat"]["accuracy_loss_points"], 1.0, False),
        ("int8_qat_conversion_loss_points", int8["int8_qat"]["conversion_loss_points"], None, False),
        ("int8_ptq_accuracy_loss_points", int8["int8_ptq"]["accuracy_loss_points"], None, False),
    ]
    if "int8_ptq_compiled" in result["int8"]["hidden_1024"]:
        compiled = result["int8"]["hidden_1024"]
        speedup = compiled["fp32"]["median_ms"] / compiled["int8_ptq_compiled"]["median_ms"]
        figures.insert(3, ("int8_ptq_compiled_cpu_speedup_hidden_1024", speedup, 1.5, True))
    return figures


def memory_headline(result: dict) -> list[tuple]:
    memory = result["memory"]["blockwise_flex"]
    lengths = sorted(memory)
    return [
        (
            "blockwise_flex_memory_growth_per_doubling",
            (memory[lengths[-1]]["forward_peak_mb"] / memory[lengths[-2]]["forward_peak_mb"]),
            2.0,
            False,
        ),
        ("mla_cache_reduction_deepseek_v3", result["mla_cache"]["deepseek_v3_bf16"]["reduction"], None, True),
        (
            "mla_cache_reduction_v2_vs_67b_6bit",
            result["mla_cache"]["deepseek_v2_vs_67b"]["reduction_v2_6bit_vs_67b_bf16"],
            0.933,
            True,
        ),
    ]


REPORTS = {  # part: (table printer, headline figures)
    "head_skipping": (print_head_skipping, head_skipping_headline),
    "int8": (print_int8, int8_headline),
    "memory": (print_memory, memory_headline),
}


def headline(result: dict, parts: list[str]) -> list[dict]:
    figures = [figure for part in parts for figure in REPORTS[part][1](result)]
    return [
        {"name": name, "value": round(value, 4), "target": target, "higher_is_better": higher}
        for name, value, target, higher in figures
    ]


def main() -> None:
    args = parse_args()
    lengths = [int(length) for length in args.memory_lengths.split(",")]
    if args.memory_worker:
        memory_worker(args.memory_worker, lengths)
        return
    parts = [part for part in PARTS if part in args.parts.split(",")]
    started = time.perf_counter()
    result = {
        "benchmark": "bench_efficiency",
        "command": " ".join([Path(sys.executable).name, "benchmarks/bench_efficiency.py", *sys.argv[1:]]),
        "machine": machine_info("cpu"),
        "parts": parts,
    }
    models, processor, training = load_models(args)
    settings = demo_settings(args)
    _, test_rows = demo_data(settings)
    test_examples = encode_rows(processor, test_rows, models["fp32"].config.patch_size, progress=False)
    result["training"] = {key: value for key, value in training.items() if key != "log_history"}
    result["training_last_log"] = training["log_history"][-1]
    if "head_skipping" in parts:
        print("(a) head skipping")
        result["head_skipping"] = {
            str(length): bench_head_skipping(models["fp32"], test_examples, length, args)
            for length in (int(length) for length in args.skip_lengths.split(","))
        }
    if "int8" in parts:
        print("(b) INT8")
        rows = accuracy_rows(settings, args)
        accuracy_data = (rows, encode_rows(processor, rows, models["fp32"].config.patch_size, progress=False))
        result["int8"] = bench_int8(models, processor, test_examples, accuracy_data, args)
    if "memory" in parts:
        print("(c) memory")
        result["memory"] = bench_memory(args)
        result["mla_cache"] = bench_cache(models["fp32"])
    result["wall_time_s"] = time.perf_counter() - started
    result["headline"] = headline(result, parts)
    for part in parts:
        REPORTS[part][0](result)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"Wrote {args.output} ({result['wall_time_s']:.0f} s)")


if __name__ == "__main__":
    main()
