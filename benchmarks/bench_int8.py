"""INT8 inference on CPU: fp32 against INT8 PTQ (the linear layers alone, and with the routed experts) and QAT:
latency, accuracy, agreement with fp32, and model size.

Command (from the repository root):

    .venv/bin/python benchmarks/bench_int8.py                 # CPU; trains and caches the demo model on first run
    .venv/bin/python benchmarks/bench_int8.py --retrain       # train the cached models again
    .venv/bin/python benchmarks/bench_int8.py --compile-int8  # + compiled variants of the hidden-1024 models

The models are the demo model trained with the gate-sparsity penalty and its QAT copy (`_efficiency_models`: the
first run trains them, about 4 minutes of an 8-minute run on 2 idle CPU cores). QAT fake-quantizes the linear layers
and the routed experts. The int8 models come from `load_int8_model`, so their linear layers run on
`int8_linear_forward` and their experts on `INT8_EXPERTS_IMPLEMENTATION`.

- Demo model: fp32 vs INT8 PTQ of the linear layers only (`load_int8_model(..., include_experts=False)`), PTQ with
  the routed experts (`load_int8_model`: transformers' `TorchAoConfig`) and QAT (prepared, trained, converted):
  forward latency of 16 test conversations (interleaved rounds, medians), accuracy (closed-set scoring,
  `deepseekv3.training.evaluation`) on a fresh draw of the data (seed + 1, `--eval-images` and `--eval-clips`, every
  row but the held-out task's: 5,200 rows by default), with the paired standard error of each difference to fp32;
  the logits' agreement with fp32 on the timed batch (largest difference, mean KL divergence, top-1 agreement), and
  of the QAT model with its fake-quantized simulation and with PTQ; the share of the fp32 forward that the
  quantized modules take; the checkpoint sizes.
- Hidden 1024 (random weights, latency only), where the matmuls are large enough for int8 kernels to pay: a 2-layer
  dense model, and a 2-layer MoE model of DeepSeek-V3's proportions (64 routed experts of intermediate size 256, 8
  per token in 4 of 8 groups, 1 shared expert). Like for like: eager fp32 against eager int8 and, with
  `--compile-int8`, fp32 against int8 with the linear layers of both compiled (the routed experts run eagerly on
  both sides: their per-expert loop depends on the routing). The MoE model's fp32 runs both of transformers' CPU
  experts kernels (`grouped_mm`, the default, and the per-expert `eager` loop), and int8 is compared with the faster.
- DeepSeek-V3-shaped model, scaled down (random weights at DeepSeek-V3's initialisation, 256 routed experts per
  MoE layer): checkpoint sizes, the logits' agreement with fp32, and QAT conversion (prepared, not trained,
  converted) against its fake-quantized simulation and against PTQ.

Writes `benchmarks/results/bench_int8.json` (machine, versions, every figure, `headline`).
"""

import argparse
import statistics
import tempfile
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
from transformers import AutoModelForCausalLM, PreTrainedModel

from deepseekv3 import DeepseekV3MultimodalConfig, DeepseekV3MultimodalForConditionalGeneration
from deepseekv3.data import build_multimodal_dataset, split_held_out
from deepseekv3.quantization import (
    INT8_EXPERTS_IMPLEMENTATION,
    convert_qat,
    has_int8_experts,
    load_int8_model,
    prepare_qat,
)
from deepseekv3.training.collators import InstructionCollator, encode_rows
from deepseekv3.training.evaluation import predict_answers

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "bench_int8.json"

_HIDDEN_1024 = {
    "vocab_size": 4096,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "q_lora_rank": 512,
    "kv_lora_rank": 256,
    "qk_rope_head_dim": 32,
    "qk_nope_head_dim": 64,
    "v_head_dim": 64,
    "use_attention_gate": True,
    "max_position_embeddings": 1024,
}
HIDDEN_1024_DENSE = {
    **_HIDDEN_1024,
    "first_k_dense_replace": 2,
    "n_routed_experts": 8,
    "n_group": 1,
    "topk_group": 1,
    "num_experts_per_tok": 2,
}
# DeepSeek-V3's proportions at hidden 1024: routed experts of 2/7 of the hidden size, 8 per token in 4 of 8 groups
HIDDEN_1024_MOE = {
    **_HIDDEN_1024,
    "first_k_dense_replace": 0,
    "moe_intermediate_size": 256,
    "n_routed_experts": 64,
    "n_shared_experts": 1,
    "n_group": 8,
    "topk_group": 4,
    "num_experts_per_tok": 8,
}
# DeepSeek-V3 (hidden 7168, 61 layers of which 3 dense, 128 heads, intermediate sizes 18432 and 2048, 256 routed
# experts, 8 per token in 4 of 8 groups, LoRA ranks 1536 and 512) at 1/14 of the width and 1/15 of the depth, its
# routing as it is
DEEPSEEK_V3_SHAPED = {
    "vocab_size": 4096,
    "hidden_size": 512,
    "intermediate_size": 1344,
    "moe_intermediate_size": 128,
    "num_hidden_layers": 4,
    "first_k_dense_replace": 1,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "q_lora_rank": 128,
    "kv_lora_rank": 64,
    "qk_rope_head_dim": 16,
    "qk_nope_head_dim": 32,
    "v_head_dim": 32,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "n_group": 8,
    "topk_group": 4,
    "num_experts_per_tok": 8,
    "max_position_embeddings": 1024,
}


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
        help="add hidden-1024 variants whose linear layers are compiled, fp32 and int8 (inductor fuses torchao's "
        "int8 matmuls)",
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


def int8_eval_model(model: PreTrainedModel) -> PreTrainedModel:
    """`eval_model` (eval mode, the demo's per-expert fp32 kernel), with the int8 experts kernel where the routed
    experts are int8."""
    eval_model(model)
    if has_int8_experts(model):
        model.set_experts_implementation(INT8_EXPERTS_IMPLEMENTATION)
    return model


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


def forward_logits(model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def logit_agreement(reference: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
    """How far `logits` are from `reference` (both `(batch, seq, vocab)`) at the real positions (`mask`): the largest
    absolute difference (next to the reference's standard deviation), the difference's norm relative to the
    reference's, the mean KL divergence `KL(reference || logits)` in nats, and the share of positions whose most
    likely token is the same."""
    keep = torch.ones(reference.shape[:-1], dtype=torch.bool) if mask is None else mask.bool()
    reference, logits = reference[keep].double(), logits[keep].double()
    log_p, log_q = reference.log_softmax(-1), logits.log_softmax(-1)
    return {
        "max_abs_diff": float((logits - reference).abs().max()),
        "reference_std": float(reference.std()),
        "relative_l2": float((logits - reference).norm() / reference.norm()),
        "mean_kl": float((log_p.exp() * (log_p - log_q)).sum(-1).mean()),
        "top1_agreement": float((reference.argmax(-1) == logits.argmax(-1)).double().mean()),
    }


def checkpoint_sizes(models: dict, directory: Path) -> dict:
    """Bytes of each model's `save_pretrained` weights (safetensors, written under `directory`), and their ratio to
    the first model's."""
    sizes = {}
    for name, model in models.items():
        model.save_pretrained(directory / name)
        sizes[name] = sum(file.stat().st_size for file in (directory / name).glob("*.safetensors"))
    first = next(iter(sizes.values()))
    return {"bytes": sizes, "ratio_to_fp32": {name: size / first for name, size in sizes.items()}}


def expert_parameter_share(model) -> float:
    """Share of the model's parameters in the routed experts' fused weights."""
    experts = sum(p.numel() for name, p in model.named_parameters() if name.split(".")[-2] == "experts")
    return experts / sum(p.numel() for p in model.parameters())


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
    # the process's CPU time per step: what a step costs when the machine's other jobs take turns on its cores
    threads = torch.get_num_threads()
    cpu_medians = {
        name: statistics.median(r["times"][name] * r["cpu_utilization"][name] * threads for r in kept)
        for name in variants
    }
    first = variants[0]
    return {
        name: {
            "median_ms": medians[name] * 1000,
            "speedup": medians[first] / medians[name],
            "median_cpu_ms": cpu_medians[name] * 1000,
            "cpu_time_speedup": cpu_medians[first] / cpu_medians[name],
            "rounds_kept": len(kept),
            "only_clean_rounds_kept": all(r["clean"] for r in kept),
        }
        for name in variants
    }


def quantized_module_share(fp32_model, int8_model, batch: dict, repeats: int = 20) -> dict:
    """Share of the fp32 forward spent in the modules PTQ quantizes, the linear layers and the routed experts apart
    (timed with forward hooks), and the speed-up int8 could give at best if they took no time at all (Amdahl's
    bound)."""
    kinds = {
        name: "linear_layers" if isinstance(module, torch.nn.Linear) else "routed_experts"
        for name, module in int8_model.named_modules()
        if any(type(parameter.data) is not torch.Tensor for parameter in module.parameters(recurse=False))
    }
    spent, started = dict.fromkeys(("linear_layers", "routed_experts"), 0.0), {}

    def before(module, args):
        started[module] = time.perf_counter()

    def after_timer(kind: str):
        def after(module, args, output):
            spent[kind] += time.perf_counter() - started[module]

        return after

    hooks = [
        hook
        for name, module in fp32_model.named_modules()
        if name in kinds
        for hook in (module.register_forward_pre_hook(before), module.register_forward_hook(after_timer(kinds[name])))
    ]
    with torch.no_grad():
        fp32_model(**batch)  # warm-up
        spent.update(dict.fromkeys(spent, 0.0))
        start = time.perf_counter()
        for _ in range(repeats):
            fp32_model(**batch)
        total = time.perf_counter() - start
    for hook in hooks:
        hook.remove()
    shares = {kind: seconds / total for kind, seconds in spent.items()}
    return {
        "quantized_linears": sum(kind == "linear_layers" for kind in kinds.values()),
        "quantized_experts_modules": sum(kind == "routed_experts" for kind in kinds.values()),
        "share_of_forward": shares,
        "speedup_bound": 1 / (1 - sum(shares.values())),
    }


def compile_linear_layers(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.compile()
    return model


def bench_demo(models: dict, processor, examples, accuracy_data, args, directory: Path) -> dict:
    """The demo model's figures: latency, accuracy, logit agreement, the quantized modules' share, sizes."""
    batch = InstructionCollator(models["fp32"].config)(examples[:16])
    batch.pop("labels")
    print(f"  INT8 latency: batch {tuple(batch['input_ids'].shape)}")
    figures = {"demo_batch": list(batch["input_ids"].shape), "demo": time_forwards(models, batch, args)}
    figures["demo_quantized_module_share"] = quantized_module_share(models["fp32"], models["int8_ptq"], batch)
    rows, accuracy_examples = accuracy_data
    print(f"  INT8 accuracy: {len(rows)} rows")
    figures["accuracy_rows"] = len(rows)
    correct = {name: correct_answers(model, processor, rows, accuracy_examples) for name, model in models.items()}
    # QAT's fake-quantized weights before conversion: how much of its difference to fp32 is conversion
    qat_fp32 = eval_model(AutoModelForCausalLM.from_pretrained(args.cache_dir / "qat_trained"))
    qat_fp32_correct = correct_answers(qat_fp32, processor, rows, accuracy_examples)
    logits = {name: forward_logits(model, batch) for name, model in models.items()}
    mask = batch["attention_mask"]
    for name in models:
        difference = accuracy_difference(correct["fp32"], correct[name])
        row = figures["demo"][name]
        row["accuracy"] = float(correct[name].mean())
        row["accuracy_loss_points"] = -difference["points"]
        row["accuracy_loss_standard_error_points"] = difference["standard_error_points"]
        row["logits_vs_fp32"] = logit_agreement(logits["fp32"], logits[name], mask)
    qat = figures["demo"]["int8_qat"]
    qat["fp32_weights_accuracy"] = float(qat_fp32_correct.mean())
    qat["conversion_loss_points"] = -accuracy_difference(qat_fp32_correct, correct["int8_qat"])["points"]
    qat["logits_vs_fake_quantized"] = logit_agreement(
        forward_logits(prepare_qat(qat_fp32), batch), logits["int8_qat"], mask
    )
    qat["logits_vs_int8_ptq"] = logit_agreement(logits["int8_ptq"], logits["int8_qat"], mask)
    figures["demo_sizes"] = checkpoint_sizes(
        {name: models[name] for name in ("fp32", "int8_ptq_linear", "int8_ptq")}, directory / "demo"
    )
    figures["demo_sizes"]["expert_parameter_share"] = expert_parameter_share(models["fp32"])
    return figures


def bench_deepseek_v3_shaped(directory: Path) -> dict:
    """Sizes and logit agreement of the DeepSeek-V3-shaped model (random weights), and its QAT conversion."""
    config = DeepseekV3MultimodalConfig(**DEEPSEEK_V3_SHAPED)
    torch.manual_seed(0)
    model = DeepseekV3MultimodalForConditionalGeneration(config).eval()
    model.save_pretrained(directory / "fp32")
    print(f"  DeepSeek-V3-shaped model: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters")
    models = {
        "fp32": model,
        "int8_ptq_linear": load_int8_model(directory / "fp32", include_experts=False).eval(),
        "int8_ptq": load_int8_model(directory / "fp32").eval(),
    }
    batch = {"input_ids": torch.randint(5, config.vocab_size, (4, 64))}
    logits = {name: forward_logits(model, batch) for name, model in models.items()}
    figures = {"config": DEEPSEEK_V3_SHAPED, "sizes": checkpoint_sizes(models, directory / "saved")}
    figures["sizes"]["expert_parameter_share"] = expert_parameter_share(model)
    figures["logits_vs_fp32"] = {name: logit_agreement(logits["fp32"], logits[name]) for name in models}
    fake_quantized = forward_logits(prepare_qat(model), batch)
    converted = forward_logits(convert_qat(model, directory / "qat_fp32").eval(), batch)
    figures["qat_converted"] = {
        "vs_fake_quantized": logit_agreement(fake_quantized, converted),
        "vs_int8_ptq": logit_agreement(logits["int8_ptq"], converted),
    }
    return figures


def bench_hidden_1024(args, directory: Path) -> dict:
    """Latency of the hidden-1024 dense and MoE models, eager and (`--compile-int8`) compiled, fp32 and int8."""
    input_ids = torch.randint(5, _HIDDEN_1024["vocab_size"], (8, 128))
    figures = {}
    for name, config_kwargs in (("hidden_1024", HIDDEN_1024_DENSE), ("hidden_1024_moe", HIDDEN_1024_MOE)):
        path = directory / name
        torch.manual_seed(0)
        DeepseekV3MultimodalForConditionalGeneration(DeepseekV3MultimodalConfig(**config_kwargs)).save_pretrained(path)

        def fp32(experts_implementation: str, path: Path = path) -> PreTrainedModel:
            return AutoModelForCausalLM.from_pretrained(path, experts_implementation=experts_implementation).eval()

        def int8(path: Path = path, **kwargs) -> PreTrainedModel:
            return load_int8_model(path, **kwargs).eval()

        if name == "hidden_1024":
            models = {"fp32": fp32("eager"), "int8_ptq": int8()}
        else:
            models = {
                "fp32": fp32("grouped_mm"),
                "fp32_eager_experts": fp32("eager"),
                "int8_ptq_linear": int8(include_experts=False, experts_implementation="eager"),
                "int8_ptq": int8(),
            }
        if args.compile_int8:
            # torchao's dynamic int8 matmul (quantize the activation, int8 matmul, rescale) is fused by inductor; in
            # eager mode on CPU its separate steps cost about what the int8 matmul saves
            models["fp32_compiled"] = compile_linear_layers(fp32("eager"))
            models["int8_ptq_compiled"] = compile_linear_layers(int8())
        print(f"  INT8 latency: {name} model, batch (8, 128)")
        timings = time_forwards(models, {"input_ids": input_ids}, args)
        eager_fp32 = [variant for variant in timings if variant.startswith("fp32") and "compiled" not in variant]
        fastest_fp32 = min(eager_fp32, key=lambda variant: timings[variant]["median_ms"])
        like_for_like = {"eager": (fastest_fp32, "int8_ptq")}
        if args.compile_int8:
            like_for_like["compiled"] = ("fp32_compiled", "int8_ptq_compiled")
        timings["like_for_like"] = {
            mode: {
                "fp32": reference,
                "int8": variant,
                "speedup": timings[reference]["median_ms"] / timings[variant]["median_ms"],
                "cpu_time_speedup": timings[reference]["median_cpu_ms"] / timings[variant]["median_cpu_ms"],
            }
            for mode, (reference, variant) in like_for_like.items()
        }
        figures[name] = timings
    return figures


def print_table(int8: dict) -> None:
    print(
        f"\nINT8, demo model, batch {int8['demo_batch']}: latency (CPU); accuracy on {int8['accuracy_rows']} rows "
        "(paired standard error); logits vs fp32 on the timed batch"
    )
    for name, row in int8["demo"].items():
        agreement = row["logits_vs_fp32"]
        print(
            f"{name:<16} {row['median_ms']:>8.1f} ms  x{row['speedup']:.2f}  accuracy {row['accuracy']:.4f} "
            f"({-row['accuracy_loss_points']:+.2f} +- {row['accuracy_loss_standard_error_points']:.2f} points)  "
            f"max |dlogit| {agreement['max_abs_diff']:.4f}, KL {agreement['mean_kl']:.2e}, "
            f"top-1 {agreement['top1_agreement']:.4f}"
        )
    qat = int8["demo"]["int8_qat"]
    print(
        f"QAT's fp32 weights before conversion: accuracy {qat['fp32_weights_accuracy']:.4f}; int8 conversion loss "
        f"{qat['conversion_loss_points']:.2f} points; converted vs fake-quantized logits: max |d| "
        f"{qat['logits_vs_fake_quantized']['max_abs_diff']:.2e}, KL {qat['logits_vs_fake_quantized']['mean_kl']:.2e}"
    )
    share = int8["demo_quantized_module_share"]
    shares = ", ".join(f"{kind} {value:.1%}" for kind, value in share["share_of_forward"].items())
    print(
        f"the modules PTQ quantizes take {shares} of the fp32 forward: int8 could be at most "
        f"x{share['speedup_bound']:.2f} faster on the demo model"
    )
    for label, sizes in (("demo", int8["demo_sizes"]), ("deepseek_v3_shaped", int8["deepseek_v3_shaped"]["sizes"])):
        line = ", ".join(
            f"{name} {size / 1e6:.2f} MB ({sizes['ratio_to_fp32'][name]:.3f})" for name, size in sizes["bytes"].items()
        )
        print(f"{label} checkpoints: {line}; routed experts {sizes['expert_parameter_share']:.1%} of the parameters")
    shaped = int8["deepseek_v3_shaped"]
    for name, agreement in shaped["logits_vs_fp32"].items():
        print(
            f"deepseek_v3_shaped {name:<16} logits vs fp32: max |d| {agreement['max_abs_diff']:.4f}, "
            f"KL {agreement['mean_kl']:.2e}, top-1 {agreement['top1_agreement']:.4f}"
        )
    for name, agreement in shaped["qat_converted"].items():
        print(f"deepseek_v3_shaped QAT converted {name}: max |d| {agreement['max_abs_diff']:.2e}")
    for model in ("hidden_1024", "hidden_1024_moe"):
        for name, row in int8[model].items():
            if name != "like_for_like":
                print(
                    f"{model} {name:<20} {row['median_ms']:>8.1f} ms  x{row['speedup']:.2f}  "
                    f"(CPU time {row['median_cpu_ms']:.1f} ms, x{row['cpu_time_speedup']:.2f})"
                )
        for mode, row in int8[model]["like_for_like"].items():
            print(
                f"{model} {mode}: {row['int8']} vs {row['fp32']} x{row['speedup']:.2f} "
                f"(CPU time x{row['cpu_time_speedup']:.2f})"
            )


def headline(int8: dict) -> list[dict]:
    demo = int8["demo"]
    figures = [
        ("int8_ptq_cpu_speedup_demo", demo["int8_ptq"]["speedup"], 1.5, True),
        ("int8_qat_cpu_speedup_demo", demo["int8_qat"]["speedup"], 1.5, True),
    ]
    for model in ("hidden_1024", "hidden_1024_moe"):
        for mode, row in int8[model]["like_for_like"].items():
            infix = "" if mode == "eager" else "_compiled"
            figures.append((f"int8_ptq{infix}_cpu_speedup_{model}", row["speedup"], 1.5, True))
            figures.append((f"int8_ptq{infix}_cpu_speedup_{model}_by_cpu_time", row["cpu_time_speedup"], 1.5, True))
    ratios = int8["deepseek_v3_shaped"]["sizes"]["ratio_to_fp32"]
    figures += [
        ("int8_ptq_size_ratio_deepseek_v3_shaped", ratios["int8_ptq"], None, False),
        ("int8_ptq_linear_size_ratio_deepseek_v3_shaped", ratios["int8_ptq_linear"], None, False),
        ("int8_qat_accuracy_loss_points", demo["int8_qat"]["accuracy_loss_points"], 1.0, False),
        ("int8_qat_conversion_loss_points", demo["int8_qat"]["conversion_loss_points"], None, False),
        ("int8_ptq_accuracy_loss_points", demo["int8_ptq"]["accuracy_loss_points"], None, False),
        ("int8_ptq_linear_accuracy_loss_points", demo["int8_ptq_linear"]["accuracy_loss_points"], None, False),
    ]
    return headline_entries(figures)


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    result = benchmark_record(__file__, "cpu")
    models, processor, training = load_models(args, MODEL_VARIANTS)
    result.update(training)
    models = {
        "fp32": models["fp32"],
        "int8_ptq_linear": int8_eval_model(load_int8_model(args.cache_dir / "fp32", include_experts=False)),
        "int8_ptq": int8_eval_model(models["int8_ptq"]),
        "int8_qat": int8_eval_model(models["int8_qat"]),
    }
    patch_size = models["fp32"].config.patch_size
    examples = encoded_test_split(processor, args, patch_size)
    rows = accuracy_rows(args)
    accuracy_data = (rows, encode_rows(processor, rows, patch_size, progress=False))
    with tempfile.TemporaryDirectory() as directory:
        result["int8"] = bench_demo(models, processor, examples, accuracy_data, args, Path(directory))
        print("  DeepSeek-V3-shaped model: sizes, logits")
        result["int8"]["deepseek_v3_shaped"] = bench_deepseek_v3_shaped(Path(directory) / "deepseek_v3_shaped")
        result["int8"].update(bench_hidden_1024(args, Path(directory)))
    result["headline"] = headline(result["int8"])
    print_table(result["int8"])
    write_results(result, args.output, started)


if __name__ == "__main__":
    main()
