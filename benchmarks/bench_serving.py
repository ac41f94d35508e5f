"""Serving throughput and latency: sequential `generate`, static batches of `generate`, and the continuous-batching
engine without and with the length predictor and the self-tuning scheduler, on one model and one request trace.

The model is a DeepSeek-V3 multimodal decoder (4 layers, hidden 128, MLA, 8 routed experts, attention gate) with
random weights and one planted behaviour that stands in for a trained model's: the last prompt token says how long
the answer is. Tokens 100..163 form a chain (each token's LM-head row is set to the direction of the previous
chain token's embedding, and the embeddings are scaled up so the residual stream carries them), so a prompt ending
in chain token k is answered with k-1 chain tokens and EOS: k tokens, decided by the prompt, as the length
predictor has to learn it. The full forward still runs on every token (the cost is the model's, not the chain's).

The trace: 48 requests (`--requests`), prompts of 8-48 random tokens, answer lengths 2-8 (60 %), 12-24 (30 %) and
40-64 (10 %), every request with `max_new_tokens=64` (the cap a client sends), all arriving at t = 0. Variants:

- (a) sequential: `model.generate` one request at a time;
- (b) static: FIFO batches of 16, left-padded, one `generate` each (a batch ends when its longest answer does);
- (c) engine: continuous batching, `max_batch_size=32`, token budget 1536, admission by the worst case
  (prompt + `max_new_tokens`), no predictor;
- (d) engine + predictor + bandit: the same token budget, the LSTM length predictor trained on the engine's own
  logs of a separate 500-request trace, and the UCB scheduler choosing the batch size (8, 16, 32, 48 or 64) online
  (it keeps learning across rounds; reward = tokens/s within a 0.25 s inter-token latency bound).

Latency is per request, from t = 0 to its last token. Each round runs every variant once on the whole trace (the
harness interleaves and rotates them, reruns contended rounds); the tables give medians over the kept rounds.
A router section measures the full model against a lite one (its first layer only, same weights) on the same trace.

Threads: one torch thread by default. At hidden 128 a matrix product is far too small for intra-op parallelism to
pay, and on a shared 2-core machine two OpenMP threads stall at every barrier whenever another process holds a core:
measured here, a batch-1 decoding step took ~180 ms with 2 threads and ~7 ms with 1 (`--threads 2` to compare).

    python benchmarks/bench_serving.py                   # about 4 minutes on 2 CPU cores
    python benchmarks/bench_serving.py --device cuda
"""

import argparse
import dataclasses
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from _harness import MIN_CPU_UTILIZATION, kept_rounds, machine_info, time_variants

from deepseekv3 import DeepseekV3MultimodalConfig, DeepseekV3MultimodalForConditionalGeneration
from deepseekv3.serving import (
    Engine,
    EngineConfig,
    LengthPredictor,
    LengthPredictorConfig,
    SchedulerSetting,
    SelfTuningScheduler,
)
from deepseekv3.serving.router import Router, RoutingPolicy

VARIANTS = ("sequential", "static", "engine", "engine_predictor_bandit")
RESULTS_PATH = Path(__file__).resolve().parent / "results" / "bench_serving.json"
MODEL_KWARGS = {
    "vocab_size": 512,
    "hidden_size": 128,
    "intermediate_size": 256,
    "moe_intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "n_shared_experts": 1,
    "n_routed_experts": 8,
    "n_group": 4,
    "topk_group": 2,
    "num_experts_per_tok": 2,
    "first_k_dense_replace": 1,
    "kv_lora_rank": 32,
    "q_lora_rank": 48,
    "qk_rope_head_dim": 16,
    "qk_nope_head_dim": 16,
    "v_head_dim": 16,
    "max_position_embeddings": 256,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "use_attention_gate": True,
}
CHAIN_START, MAX_NEW_TOKENS = 100, 64
CONTENT_TOKENS = (200, 512)
STATIC_BATCH = 16
ENGINE_CONFIG = EngineConfig(max_batch_size=32, max_batch_tokens=1536, max_queue_size=4096)
BANDIT_SETTINGS = [SchedulerSetting(size, 1536) for size in (8, 16, 32, 48, 64)]
LATENCY_BOUND_S = 0.25
TARGETS = {"engine_predictor_bandit_vs_sequential": 5.0, "engine_predictor_bandit_vs_static": 1.5}


def build_model(device: str) -> DeepseekV3MultimodalForConditionalGeneration:
    """The benchmark model with the planted length chain (see the module docstring)."""
    torch.manual_seed(0)
    model = DeepseekV3MultimodalForConditionalGeneration(DeepseekV3MultimodalConfig(**MODEL_KWARGS)).eval()
    with torch.no_grad():
        embeddings = model.model.embed_tokens.weight
        embeddings.mul_(20.0)  # the residual stream carries the current token past the random layers
        directions = torch.nn.functional.normalize(embeddings, dim=-1)
        for k in range(1, MAX_NEW_TOKENS + 1):
            successor = CHAIN_START + k - 2 if k > 1 else MODEL_KWARGS["eos_token_id"]
            model.lm_head.weight[successor] = 5.0 * directions[CHAIN_START + k - 1]
    return model.to(device)


def make_trace(count: int, seed: int) -> list[tuple[list[int], int]]:
    """`count` (prompt, answer length) pairs (see the module docstring)."""
    rng = random.Random(seed)
    trace = []
    for _ in range(count):
        draw = rng.random()
        length = rng.randint(2, 8) if draw < 0.6 else rng.randint(12, 24) if draw < 0.9 else rng.randint(40, 64)
        content = [rng.randrange(*CONTENT_TOKENS) for _ in range(rng.randint(8, 48))]
        trace.append(([1, *content, CHAIN_START + length - 1], length))
    return trace


def new_tokens_of(row: list[int], eos: int) -> list[int]:
    return row[: row.index(eos) + 1] if eos in row else row


def run_sequential(model, trace) -> tuple[list[list[int]], list[float]]:
    outputs, latencies, start = [], [], time.perf_counter()
    device = model.device
    for prompt, _ in trace:
        output = model.generate(
            input_ids=torch.tensor([prompt], device=device), max_new_tokens=MAX_NEW_TOKENS, do_sample=False
        )
        outputs.append(output[0, len(prompt) :].tolist())
        latencies.append(time.perf_counter() - start)
    return outputs, latencies


def run_static(model, trace) -> tuple[list[list[int]], list[float]]:
    outputs, latencies, start = [], [], time.perf_counter()
    device, eos = model.device, MODEL_KWARGS["eos_token_id"]
    for first in range(0, len(trace), STATIC_BATCH):
        prompts = [prompt for prompt, _ in trace[first : first + STATIC_BATCH]]
        width = max(len(prompt) for prompt in prompts)
        input_ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        output = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=MAX_NEW_TOKENS, do_sample=False
        )
        finished = time.perf_counter() - start
        for row in output[:, width:].tolist():
            outputs.append(new_tokens_of(row, eos))
            latencies.append(finished)
    return outputs, latencies


def run_engine(engine: Engine, trace) -> tuple[list[list[int]], list[float]]:
    handles = [engine.submit(prompt, max_new_tokens=MAX_NEW_TOKENS) for prompt, _ in trace]
    engine.run_until_idle()
    results = [handle.result() for handle in handles]
    return [result.token_ids for result in results], [result.latency_s for result in results]


def train_predictor(model, device: str) -> tuple[LengthPredictor, dict]:
    """Runs a separate 500-request trace through the engine, trains the LSTM on 400 of its logs, reports the MAE on
    the other 100 (and the untrained fallback's)."""
    # the length log keeps prompt tokens (the predictor's input) only when asked to
    engine = Engine(model, dataclasses.replace(ENGINE_CONFIG, log_prompt_tokens=128))
    run_engine(engine, make_trace(500, seed=101))
    logs = list(engine.length_log)
    train, held_out = logs[:400], logs[400:]
    predictor = LengthPredictor(LengthPredictorConfig(vocab_size=MODEL_KWARGS["vocab_size"]))
    fallback_mae = predictor.mean_absolute_error(held_out)
    started = time.perf_counter()
    history = predictor.fit(train, epochs=12)
    info = {
        "train_logs": len(train),
        "held_out_logs": len(held_out),
        "fit_seconds": time.perf_counter() - started,
        "final_train_loss": history[-1],
        "held_out_mae_tokens": predictor.mean_absolute_error(held_out),
        "untrained_fallback_mae_tokens": fallback_mae,
        "held_out_mean_length": statistics.mean(record.generated_length for record in held_out),
    }
    return predictor, info


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def measure_router(full_model, trace) -> dict:
    """Full model alone vs a router sending prompts of at most 30 tokens to a lite model (the full model's first
    layer): tokens/s, p99 latency and the share of answers equal to the full model's."""
    lite_config = DeepseekV3MultimodalConfig(**{**MODEL_KWARGS, "num_hidden_layers": 1})
    lite_model = DeepseekV3MultimodalForConditionalGeneration(lite_config).eval()
    lite_model.load_state_dict(full_model.state_dict(), strict=False)
    lite_model.to(full_model.device)
    reference_engine = Engine(full_model, ENGINE_CONFIG)
    start = time.perf_counter()
    reference, full_latencies = run_engine(reference_engine, trace)
    full_seconds = time.perf_counter() - start
    router = Router(full_model, lite_model, RoutingPolicy(max_lite_prompt_tokens=30), ENGINE_CONFIG)
    start = time.perf_counter()
    handles = [router.submit(prompt, max_new_tokens=MAX_NEW_TOKENS) for prompt, _ in trace]
    router.run_until_idle()
    routed = [handle.result() for handle in handles]
    routed_seconds = time.perf_counter() - start
    lite_rows = [d.model == "lite" for d in router.decisions]
    tokens = sum(len(r) for r in reference)
    return {
        "policy": "prompts of at most 30 tokens -> lite (1 layer of the same weights), the rest -> full",
        "lite_fraction": sum(lite_rows) / len(lite_rows),
        "full_only": {"tokens_per_s": tokens / full_seconds, "p99_latency_s": percentile(full_latencies, 0.99)},
        "routed": {
            "tokens_per_s": sum(len(r.token_ids) for r in routed) / routed_seconds,
            "p99_latency_s": percentile([r.latency_s for r in routed], 0.99),
        },
        "answers_equal_to_full": sum(r.token_ids == ref for r, ref in zip(routed, reference)) / len(trace),
        "lite_answers_equal_to_full": sum(
            r.token_ids == ref for r, ref, is_lite in zip(routed, reference, lite_rows) if is_lite
        )
        / max(1, sum(lite_rows)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--requests", type=int, default=48, help="requests in the trace (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="clean rounds wanted (default: %(default)s)")
    parser.add_argument("--budget-s", type=float, default=200.0, help="stop adding rounds after this many seconds")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads on CPU (default: %(default)s; see the docstring)"
    )
    parser.add_argument("--output", type=Path, default=RESULTS_PATH)
    args = parser.parse_args()
    started = time.perf_counter()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    model = build_model(args.device)
    trace = make_trace(args.requests, seed=0)
    # the planted answer to a prompt ending in chain token k: chain tokens k-1 .. 1, then EOS
    expected = [[CHAIN_START + length - 2 - i for i in range(length - 1)] + [2] for _, length in trace]

    print("Training the length predictor on the engine's logs of a separate trace")
    predictor, predictor_info = train_predictor(model, args.device)
    print(
        f"  held-out MAE {predictor_info['held_out_mae_tokens']:.2f} tokens "
        f"(untrained fallback: {predictor_info['untrained_fallback_mae_tokens']:.2f})"
    )
    scheduler = SelfTuningScheduler(BANDIT_SETTINGS, LATENCY_BOUND_S, epoch_steps=4)
    engines = {
        "engine": Engine(model, ENGINE_CONFIG),
        "engine_predictor_bandit": Engine(model, ENGINE_CONFIG, predictor, scheduler),
    }
    runners = {
        "sequential": lambda: run_sequential(model, trace),
        "static": lambda: run_static(model, trace),
        "engine": lambda: run_engine(engines["engine"], trace),
        "engine_predictor_bandit": lambda: run_engine(engines["engine_predictor_bandit"], trace),
    }
    records = {name: [] for name in VARIANTS}
    outputs = {}

    def make_step(name):
        def step() -> float:
            start = time.perf_counter()
            answers, latencies = runners[name]()
            seconds = time.perf_counter() - start
            outputs[name] = answers
            records[name].append({"seconds": seconds, "tokens": sum(map(len, answers)), "latencies": latencies})
            return float(sum(map(len, answers)))

        return step

    print(f"Timing {len(VARIANTS)} variants on {len(trace)} requests, interleaved rounds")
    rounds, _ = time_variants(
        {name: make_step(name) for name in VARIANTS}, VARIANTS, args.repeats, args.budget_s, args.device, started
    )
    for name in VARIANTS:
        if outputs[name] != expected:
            raise RuntimeError(
                f"{name} answered differently from the planted lengths: the variants are not comparable"
            )
    kept = kept_rounds(rounds)
    kept_index = [index for index, r in enumerate(rounds) if any(r is k for k in kept)]
    summary = {}
    for name in VARIANTS:
        timed = records[name][1:]  # the first call is the harness's warm-up
        chosen = [timed[index] for index in kept_index]
        summary[name] = {
            "tokens_per_s": statistics.median(r["tokens"] / r["seconds"] for r in chosen),
            "p50_latency_s": statistics.median(percentile(r["latencies"], 0.5) for r in chosen),
            "p99_latency_s": statistics.median(percentile(r["latencies"], 0.99) for r in chosen),
            "seconds": statistics.median(r["seconds"] for r in chosen),
        }
    best = summary["engine_predictor_bandit"]
    ratios = {
        "engine_predictor_bandit_vs_sequential": best["tokens_per_s"] / summary["sequential"]["tokens_per_s"],
        "engine_predictor_bandit_vs_static": best["tokens_per_s"] / summary["static"]["tokens_per_s"],
        "engine_vs_static": summary["engine"]["tokens_per_s"] / summary["static"]["tokens_per_s"],
        "p99_engine_predictor_bandit_over_static": best["p99_latency_s"] / summary["static"]["p99_latency_s"],
    }
    bandit_choice = scheduler.settings[scheduler.bandit.best_arm()]
    print("Measuring the router (full vs lite)")
    router_info = measure_router(model, trace)

    print(f"\n{'variant':32} {'tokens/s':>9} {'p50 s':>7} {'p99 s':>7}")
    for name in VARIANTS:
        row = summary[name]
        print(f"{name:32} {row['tokens_per_s']:>9.1f} {row['p50_latency_s']:>7.2f} {row['p99_latency_s']:>7.2f}")
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}")
    print(f"bandit's best setting: {bandit_choice}; arm counts {scheduler.bandit.counts}")
    print(f"router: {json.dumps(router_info)}")
    if not all(r["clean"] for r in kept):
        print(f"WARNING: {sum(r['clean'] for r in rounds)} of {len(rounds)} rounds ran uncontended; figures use all")

    result = {
        "benchmark": "bench_serving",
        "command": " ".join([Path(sys.executable).name, "benchmarks/bench_serving.py", *sys.argv[1:]]),
        "machine": machine_info(args.device),
        "model": MODEL_KWARGS,
        "trace": {
            "requests": len(trace),
            "answer_tokens": sum(length for _, length in trace),
            "prompt_tokens": sum(len(prompt) for prompt, _ in trace),
            "max_new_tokens": MAX_NEW_TOKENS,
            "arrival": "all at t = 0",
        },
        "settings": {
            "static_batch": STATIC_BATCH,
            "engine": {"max_batch_size": ENGINE_CONFIG.max_batch_size, "max_batch_tokens": 1536},
            "bandit_settings": [[s.max_batch_size, s.max_batch_tokens] for s in BANDIT_SETTINGS],
            "latency_bound_s": LATENCY_BOUND_S,
        },
        "rounds_run": len(rounds),
        "rounds_kept": len(kept),
        "only_clean_rounds_kept": all(r["clean"] for r in kept),
        "min_cpu_utilization": MIN_CPU_UTILIZATION,
        "rounds": rounds,
        "variants": summary,
        "ratios": ratios,
        "predictor": predictor_info,
        "bandit": {
            "best_setting": [bandit_choice.max_batch_size, bandit_choice.max_batch_tokens],
            "counts": scheduler.bandit.counts,
            "epochs": sum(scheduler.bandit.counts),
        },
        "router": router_info,
        "outputs_equal_across_variants": True,
        "wall_time_s": time.perf_counter() - started,
        "headline": [
            *(
                {
                    "name": f"{name}_tokens_per_s_ratio",
                    "value": round(ratios[name], 3),
                    "target": target,
                    "higher_is_better": True,
                }
                for name, target in TARGETS.items()
            ),
            {
                "name": "p99_latency_engine_predictor_bandit_over_static",
                "value": round(ratios["p99_engine_predictor_bandit_over_static"], 3),
                "target": 1.0,
                "higher_is_better": False,
            },
        ],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"Wrote {args.output} ({result['wall_time_s']:.0f} s)")


if __name__ == "__main__":
    main()
