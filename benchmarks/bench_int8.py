"""INT8 inference on CPU: fp32 against INT8 PTQ and QAT, latency and accuracy.

Command (from the repository root):

    .venv/bin/python benchmarks/bench_int8.py                 # CPU; trains and caches the demo model on first run
    .venv/bin/python benchmarks/bench_int8.py --retrain       # train the cached models again
    .venv/bin/python benchmarks/bench_int8.py --compile-int8  # + compiled INT8 variants (README figures)

The models are the demo model trained with the gate-sparsity penalty and its QAT copy (`_efficiency_models`, shared
with `bench_head_skipping.py`: the first run of either trains them, 15 minutes on 2 busy CPU cores; later runs of
this one take 2.5 minutes on one core).

fp32 vs INT8 PTQ (`load_int8_model`: transformers' `TorchAoConfig`) vs QAT (prepared, trained, converted): forward
latency of 16 test conversations on CPU (interleaved rounds) and accuracy (closed-set scoring,
`deepseekv3.training.evaluation`) on a fresh draw of the data (seed + 1, `--eval-images` and `--eval-clips`, every
row but the held-out task's: 5,200 rows by default, against the 520 of the test split), with the paired standard
error of each difference to fp32. Also the same latency for a 2-layer dense model at hidden 1024 (random weights),
where the matmuls are large enough for int8 kernels to pay.

Writes `benchmarks/results/bench_int8.json` (machine, versions, every figure, `headline`).
"""

import argparse
import time
from pathlib import Path

import torch
from _efficiency_models import (
    MODEL_VARIANTS,
    add_training_arguments,
    check_training_arguments,
    demo_settings,
    encoded_test_split,
    eval_model,
    load_models,
)
from _harness import benchmark_record, headline_entries, median_times, write_results
from transformers import AutoModelForCausalLM

from deepseekv3 import DeepseekV3MultimodalConfig, DeepseekV3MultimodalForConditionalGeneration
from deepseekv3.data import build_multimodal_dataset, split_held_out
from deepseekv3.quantization import load_int8_model
from deepseekv3.training.collators import InstructionCollator, encode_rows
from deepseekv3.training.evaluation import predict_answers

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "bench_int8.json"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_training_arguments(parser)
    parser.add_argument("--eval-images", type=int, default=4000, help="images of the INT8 accuracy data")
    parser.add_argument("--eval-clips", type=int, default=2000, help="clips of the INT8 accuracy data")
    parser.add_argument("--repeats", type=int, default=5, help="clean timed rounds per comparison")
    parser.add_argument("--budget-s", type=float, default=60.0, help="time budget of one comparison's rounds")
    parser.add_argument(
        "--compile-int8",
        action="store_true",
        help="add hidden-1024 variants whose linear layers are compiled (inductor fuses torchao's int8 matmuls)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS_PATH)
    args = parser.parse_args()
    check_training_arguments(parser, args)
    return args


def accuracy_rows(args: argparse.Namespace):
    """The accuracy data: a draw of the generator the model never trained on, every row but the held-out task's
    (the test split of the training data is too small to resolve a point: see the module docstring)."""
    settings = demo_settings(args)
    data = build_multimodal_dataset(
        args.eval_images,
        args.eval_clips,
        seed=settings.seed + 1,
        image_size=settings.image_size,
        split_sizes={"test": 1.0},
    )
    seen, _ = split_held_out(data)
    return seen["test"]


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
    medians, kept = median_times(steps, variants, args.repeats, args.budget_s, "cpu")
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
    qat_fp32 = eval_model(AutoModelForCausalLM.from_pretrained(args.cache_dir / "qat_trained"))
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


def print_table(int8: dict) -> None:
    print(
        f"\nINT8, demo model, batch {int8['demo_batch']}: latency (CPU); accuracy on {int8['accuracy_rows']} rows "
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


def headline(int8: dict) -> list[dict]:
    demo, hidden_1024 = int8["demo"], int8["hidden_1024"]
    figures = [
        ("int8_ptq_cpu_speedup_demo", demo["int8_ptq"]["speedup"], 1.5, True),
        ("int8_qat_cpu_speedup_demo", demo["int8_qat"]["speedup"], 1.5, True),
        ("int8_ptq_cpu_speedup_hidden_1024", hidden_1024["int8_ptq"]["speedup"], 1.5, True),
        ("int8_qat_accuracy_loss_points", demo["int8_qat"]["accuracy_loss_points"], 1.0, False),
        ("int8_qat_conversion_loss_points", demo["int8_qat"]["conversion_loss_points"], None, False),
        ("int8_ptq_accuracy_loss_points", demo["int8_ptq"]["accuracy_loss_points"], None, False),
    ]
    if "int8_ptq_compiled" in hidden_1024:
        speedup = hidden_1024["fp32"]["median_ms"] / hidden_1024["int8_ptq_compiled"]["median_ms"]
        figures.insert(3, ("int8_ptq_compiled_cpu_speedup_hidden_1024", speedup, 1.5, True))
    return headline_entries(figures)


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    result = benchmark_record(__file__, "cpu")
    models, processor, training = load_models(args, MODEL_VARIANTS)
    result.update(training)
    patch_size = models["fp32"].config.patch_size
    examples = encoded_test_split(processor, args, patch_size)
    rows = accuracy_rows(args)
    accuracy_data = (rows, encode_rows(processor, rows, patch_size, progress=False))
    result["int8"] = bench_int8(models, processor, examples, accuracy_data, args)
    result["headline"] = headline(result["int8"])
    print_table(result["int8"])
    write_results(result, args.output, started)


if __name__ == "__main__":
    main()
