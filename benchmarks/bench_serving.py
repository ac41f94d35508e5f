"""Serving throughput and latency of a trained model: sequential `generate`, static batches of `generate` at the
engine's own batch size and token budget, one `generate` over every request, and the continuous-batching engine
with and without the length predictor and the self-tuning scheduler; all requests at t = 0, then Poisson arrivals at
three rates.

Nothing is planted. The model is the demo's (`build_demo_model`: 3 layers, hidden 96, MLA, 8 routed experts, head
gates, 32x32 images), its tokenizer trained on the data's text, instruction-tuned (recipe `instruct`, the demo's
learning rate and batch, 1,500 steps) on 4,800 training images of the built-in shapes data, each twice: once with its
question (colour, shape, count, spatial: one-word answers) and once with "describe the picture." answered by its
caption ("a red circle", up to "a yellow square left of a blue triangle and a green circle"). Answer lengths are the
model's own greedy outputs: 2 tokens for a question (the word and the end-of-turn marker), 4 to 13 for a caption,
by the number of objects in the picture, which the length predictor (it reads prompt tokens only) cannot see. The
model is trained once and kept in `outputs/serving_model/` (`--retrain` trains it again; so does a change of its
settings).

Requests: test-split images, never trained on, one request per image: its caption asked for with probability 1/2,
its question otherwise, through the processor's chat template (16 image placeholders; about 25-32 tokens), each
with its own `max_new_tokens` drawn from 8, 16, 32, 64 and 128 (the caps clients send; 8 cuts most captions of two
or three objects short).

Variants, at the engine's defaults (`EngineConfig()`: batch 16, token budget 4,096, chunked prefill 512, prefix
cache 64 MiB; a fresh engine per run, so no run finds an earlier run's prompts in the prefix cache):

- sequential: `model.generate` one request at a time (all at t = 0 only); every `generate` baseline decodes with the
  engine's attention (`absorbed_decoding`, the engine's default), so the variants differ in scheduling only;
- static: FIFO batches of `generate`, left-padded, of the requests that have arrived, at most the engine's batch
  size (16) and within its token budget (rows x (longest prompt + largest `max_new_tokens`) <= 4,096); a batch runs
  to its longest answer, and each answer is cut at its own `max_new_tokens`;
- generate_all: one `generate` over every request (all at t = 0 only; no budget);
- engine: continuous batching, admission by the worst case (prompt + `max_new_tokens`);
- engine_predictor: with the LSTM length predictor (below);
- engine_bandit: with the UCB scheduler choosing the batch size among 4, 8 and 16 at the same budget (never more
  than static gets), rewarded by tokens/s within a 50 ms inter-token latency bound; each of the two schedulers
  keeps learning across all its runs;
- engine_predictor_bandit: both;
- engine_one_batch (all at t = 0 only): the engine with what one `generate` over all has, every request in one batch
  (batch size = requests, a budget of requests x the longest prompt + `max_new_tokens`, no chunked prefill): not a
  setting to serve with, but where the gap between the engine and that baseline comes from.

The length predictor is trained on the engine's own log of a separate trace (the 600 validation-split images, the
same mix of requests and caps), the lengths cut off at `max_new_tokens` treated as censored ("at least the cap",
`LengthPredictor.fit(censoring=True)`). Its mean absolute error is measured on the all-at-t=0 trace (other images,
held out), against the same LSTM trained with the cut-off lengths as exact, the untrained fallback
(`max_new_tokens`) and the median training length.

Measured per run, from each request's arrival (its scheduled time, not when the loop picked it up): time to first
token (TTFT), the gaps between its tokens (ITL, pooled over requests), the latency to its last token, and tokens/s
over the run (generated tokens, stop tokens included, from the first arrival to the last token). A token's time is
the end of the engine step that produced it, or the moment `generate` hands its step to a streamer. An engine step
prefills the requests it admits and then decodes the whole batch, new rows included, so a new request's first two
tokens arrive together: an ITL of 0. Rows per decoding step (rows that produced a token: the engine's
`stats["decoded_rows"]`; for `generate`, the rows not yet finished) and their coefficient of variation, over every
decoding step and over the steps while requests waited: the seed's "device utilisation within +-5 %". Cache memory:
bytes per cached position of the MLA latent and rotated key (measured on the model's cache) against a per-head K/V
cache of the same heads (computed: K heads x (qk_nope + qk_rope), V heads x v_head_dim, per layer) and transformers'
own `DeepseekV3ForCausalLM` of the same text configuration (measured; it caches the latent too); per request, and
each variant's peak.

Arrivals: the three rates are 0.3, 0.6 and 0.9 times the requests/s static batching served with everything at t = 0,
each with its own Poisson arrival times for one set of requests, the same for every variant. While no request is
waiting the loop spins (no sleep), so the process's CPU time covers its wall time and the harness's contention check
holds. Each phase (t = 0, then each rate) times its variants in interleaved rounds (`_harness.time_variants`: one
warm-up run each, the starting variant rotating, contended rounds rerun); the tables give medians over the kept
rounds.

Targets, reported as met or not: the engine's tokens/s with everything at t = 0 at least 3x the best of the
baselines (sequential, static, generate_all); its p99 TTFT at the middle rate at most half of static's; its rows per
decoding step within 5 % (coefficient of variation).

Threads: one torch thread (at hidden 96 intra-op parallelism does not pay, and on a shared machine two OpenMP threads
stall at every barrier when another process holds a core).

    .venv/bin/python benchmarks/bench_serving.py           # 601 s on 2 CPU cores (every round clean), training
                                                          # the model first included (177 s of it)
    .venv/bin/python benchmarks/bench_serving.py --quick   # smoke run: 65 s on 2 busy CPU cores, no result (a
                                                          # 250-step model on 1,000 images, 24 requests, one round)

Writes `benchmarks/results/bench_serving.json` and `docs/serving_latency.png` (throughput against p50/p99 TTFT and
ITL at the three rates); `--quick` writes `/tmp/bench_serving_quick.json` and `/tmp/bench_serving_quick.png` and
keeps its model in `/tmp/bench_serving_quick_model/`.
"""

import argparse
import dataclasses
import json
import random
import statistics
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from _harness import (
    benchmark_record,
    headline_entries,
    kept_rounds,
    time_variants,
    write_results,
)
from torch.nn.utils.rnn import pad_sequence
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, set_seed
from transformers.generation.streamers import BaseStreamer
from transformers.trainer_callback import PrinterCallback

from deepseekv3.data import build_text_corpus
from deepseekv3.data.questions import build_messages
from deepseekv3.data.shapes import build_shapes_dataset
from deepseekv3.serving import (
    Engine,
    EngineConfig,
    LengthPredictor,
    LengthPredictorConfig,
    LengthRecord,
    SchedulerSetting,
    SelfTuningScheduler,
    absorbed_decoding,
)
from deepseekv3.serving.latent_batch import cache_layers
from deepseekv3.tokenization import train_tokenizer
from deepseekv3.training.collators import encode_conversations
from deepseekv3.training.demo import DemoSettings, build_demo_model, stage_training_arguments
from deepseekv3.training.recipes import build_stage_trainer
from deepseekv3.training.run import load_saved_model

ROOT = Path(__file__).resolve().parent.parent
RESULTS_PATH = ROOT / "benchmarks" / "results" / "bench_serving.json"
PLOT_PATH = ROOT / "docs" / "serving_latency.png"
MODEL_DIR = ROOT / "outputs" / "serving_model"
QUICK_OUTPUT = Path("/tmp/bench_serving_quick.json")
QUICK_MODEL_DIR = Path("/tmp/bench_serving_quick_model")

DESCRIBE = "describe the picture."
TEMPLATES = ("color", "shape", "count", "spatial")
CAPTION_SHARE = 0.5
MAX_NEW_TOKENS_CHOICES = (8, 16, 32, 64, 128)
# the engine's defaults; the queue holds a whole trace
ENGINE_CONFIG = EngineConfig(max_queue_size=4096)
BANDIT_SETTINGS = [SchedulerSetting(size, ENGINE_CONFIG.max_batch_tokens) for size in (4, 8, 16)]
LATENCY_BOUND_S = 0.05
LOG_PROMPT_TOKENS = 128
RATE_FRACTIONS = (0.3, 0.6, 0.9)
BASELINES = ("sequential", "static", "generate_all")
ENGINES = ("engine", "engine_predictor", "engine_bandit", "engine_predictor_bandit")
# the engine held to nothing but what one `generate` over all does (t = 0 only): where the gap to it comes from
ONE_BATCH = "engine_one_batch"
OFFLINE_VARIANTS = (*BASELINES, *ENGINES, ONE_BATCH)
ONLINE_VARIANTS = ("static", *ENGINES)


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """What the cached model was trained with (a change retrains it)."""

    num_images: int = 6000
    steps: int = 1500
    seed: int = 0


@dataclasses.dataclass
class Request:
    input_ids: torch.Tensor  # (prompt length,)
    pixel_values: torch.Tensor  # (1, channels, height, width)
    max_new_tokens: int
    kind: str  # "question" or "caption"
    reference: str


@dataclasses.dataclass
class Run:
    """One variant serving one trace; times in seconds from the trace's start."""

    answers: list[list[int]]
    token_times: list[list[float]]
    step_rows: list[int] = dataclasses.field(default_factory=list)  # rows that produced a token, per decoding step
    step_waiting: list[bool] = dataclasses.field(default_factory=list)  # whether requests waited at that step
    peak_cache_positions: int = 0  # rows x cached positions, padding included
    preempted: int = 0
    prefix_cache_bytes: int = 0


class StepTimes(BaseStreamer):
    """When `generate` hands over each step's tokens (the first call is the prompt)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


# ---- pure helpers (tested in tests/benchmarks/test_bench_serving.py) --------------------------------------------


def poisson_arrivals(count: int, rate: float, seed: int) -> list[float]:
    """Arrival times (seconds) of `count` requests of a Poisson process of `rate` requests/s, the first after one
    exponential gap."""
    return np.cumsum(np.random.default_rng(seed).exponential(1.0 / rate, count)).tolist()


def static_batch_size(
    prompt_lengths: Sequence[int], max_new_tokens: Sequence[int], max_batch_size: int, max_batch_tokens: int | None
) -> int:
    """How many requests from the head of a FIFO queue one `generate` batch takes: at most `max_batch_size`, with
    rows x (longest prompt + largest `max_new_tokens`) within `max_batch_tokens` (`None`: no budget); at least one."""
    size = 1
    while size < min(max_batch_size, len(prompt_lengths)):
        widest = max(prompt_lengths[: size + 1]) + max(max_new_tokens[: size + 1])
        if max_batch_tokens is not None and (size + 1) * widest > max_batch_tokens:
            break
        size += 1
    return size


def answer_tokens(row: Sequence[int], stop_ids: set[int], max_new_tokens: int) -> list[int]:
    """A request's answer from its row of `generate`'s new tokens: up to its first stop token (kept, as the engine
    keeps it), cut at its own `max_new_tokens`."""
    row = list(row[:max_new_tokens])
    stop = next((index for index, token in enumerate(row) if token in stop_ids), None)
    return row if stop is None else row[: stop + 1]


def latency_figures(arrivals: Sequence[float], token_times: Sequence[Sequence[float]]) -> dict[str, float | None]:
    """Tokens/s over the run (first arrival to last token), and p50/p99 of the time to first token, the gaps between
    tokens (pooled over requests) and the latency to the last token."""
    ttft = [times[0] - arrival for arrival, times in zip(arrivals, token_times)]
    gaps = [later - earlier for times in token_times for earlier, later in zip(times, times[1:])]
    latency = [times[-1] - arrival for arrival, times in zip(arrivals, token_times)]
    tokens = sum(len(times) for times in token_times)
    span = max(times[-1] for times in token_times) - min(arrivals)
    figures = {
        "tokens": tokens,
        "seconds": span,
        "tokens_per_s": tokens / span,
        "requests_per_s": len(arrivals) / span,
    }
    for name, values in (("ttft", ttft), ("itl", gaps), ("latency", latency)):
        p50, p99 = np.percentile(values, [50, 99]).tolist() if values else (None, None)
        figures[f"{name}_p50_s"], figures[f"{name}_p99_s"] = p50, p99
    return figures


def variation(values: Sequence[float]) -> float | None:
    """Coefficient of variation (population standard deviation over the mean); `None` for fewer than two values."""
    return statistics.pstdev(values) / statistics.mean(values) if len(values) > 1 else None


# ---- the model, the data and the requests --------------------------------------------------------------------


def scenes(settings: ModelSettings):
    """The shapes data (train / validation / test images) with the four seen question types."""
    return build_shapes_dataset(
        settings.num_images, seed=settings.seed, image_size=32, templates=TEMPLATES, held_out_templates=()
    )


def training_conversations(rows) -> list[dict]:
    """Each image twice: with its question, and asked to describe the picture (its caption as the answer)."""
    conversations = []
    for row in rows:
        conversations.append({"messages": row["messages"], "images": [row["image"]], "audios": []})
        described = build_messages(DESCRIBE, row["caption"], "image")
        conversations.append({"messages": described, "images": [row["image"]], "audios": []})
    return conversations


def train_model(settings: ModelSettings, data, directory: Path) -> dict:
    """Trains the serving model (see the module docstring) and saves it with its processor to `directory`."""
    started = time.perf_counter()
    demo = DemoSettings(output_dir=str(directory))
    corpus = build_text_corpus(settings.num_images, 0, settings.seed) + [DESCRIBE] * settings.num_images
    tokenizer = train_tokenizer(corpus, vocab_size=demo.vocab_size)
    set_seed(settings.seed)
    model, processor = build_demo_model(tokenizer, demo)
    examples = encode_conversations(processor, training_conversations(data["train"]), progress=False)
    arguments = stage_training_arguments(demo, "instruct", directory, settings.steps)
    arguments.disable_tqdm = True
    trainer = build_stage_trainer("instruct", model, examples, arguments)
    trainer.remove_callback(PrinterCallback)
    print(f"Training the serving model: {settings.steps} steps of {demo.batch_size} over {len(examples)} examples")
    trainer.train()
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    info = {
        "settings": dataclasses.asdict(settings),
        "recipe": "instruct",
        "batch_size": demo.batch_size,
        "learning_rate": demo.learning_rate,
        "train_conversations": len(examples),
        "final_logged_loss": losses[-1],
        "seconds": time.perf_counter() - started,
    }
    (directory / "serving_model.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def serving_model(settings: ModelSettings, data, directory: Path, retrain: bool, device: str):
    """The cached model and processor, trained first when missing, trained with other settings, or `retrain`."""
    info_path = directory / "serving_model.json"
    cached = info_path.is_file() and json.loads(info_path.read_text())["settings"] == dataclasses.asdict(settings)
    info = train_model(settings, data, directory) if retrain or not cached else json.loads(info_path.read_text())
    model, processor = load_saved_model(str(directory))
    return model.eval().to(device), processor, info


def build_requests(processor, rows, seed: int) -> list[Request]:
    """One request per row: its caption asked for (probability `CAPTION_SHARE`) or its question, with a cap drawn
    from `MAX_NEW_TOKENS_CHOICES`."""
    rng = random.Random(seed)
    requests = []
    for row in rows:
        kind = "caption" if rng.random() < CAPTION_SHARE else "question"
        question, reference = (DESCRIBE, row["caption"]) if kind == "caption" else (row["question"], row["answer"])
        content = [{"type": "image", "image": row["image"]}, {"type": "text", "text": question}]
        inputs = processor.apply_chat_template(
            [[{"role": "user", "content": content}]],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            processor_kwargs={"return_tensors": "pt"},
        )
        cap = rng.choice(MAX_NEW_TOKENS_CHOICES)
        requests.append(Request(inputs["input_ids"][0], inputs["pixel_values"], cap, kind, reference))
    return requests


# ---- serving a trace -------------------------------------------------------------------------------------------


def serve_static(
    model, requests: list[Request], arrivals: list[float], max_batch_size: int, max_batch_tokens: int | None
) -> Run:
    """FIFO batches of `generate` over the requests that have arrived (`static_batch_size`); see the docstring."""
    stop_ids = set(np.atleast_1d(model.generation_config.eos_token_id).tolist())
    pad = model.generation_config.pad_token_id
    run = Run([[] for _ in requests], [[] for _ in requests])
    queue, arrived, start = deque(), 0, time.perf_counter()
    while arrived < len(requests) or queue:
        now = time.perf_counter() - start
        while arrived < len(requests) and arrivals[arrived] <= now:
            queue.append(arrived)
            arrived += 1
        if not queue:
            continue  # spin until the next arrival
        lengths = [len(requests[index].input_ids) for index in queue]
        caps = [requests[index].max_new_tokens for index in queue]
        batch = [queue.popleft() for _ in range(static_batch_size(lengths, caps, max_batch_size, max_batch_tokens))]
        prompts = [requests[index].input_ids for index in batch]
        input_ids = pad_sequence(prompts, batch_first=True, padding_value=pad, padding_side="left")
        ones = [torch.ones_like(prompt) for prompt in prompts]
        attention_mask = pad_sequence(ones, batch_first=True, padding_value=0, padding_side="left")
        clock = StepTimes()
        with torch.no_grad(), absorbed_decoding(model):  # the engine's decoding attention (its default)
            output = model.generate(
                input_ids=input_ids.to(model.device),
                attention_mask=attention_mask.to(model.device),
                pixel_values=torch.cat([requests[index].pixel_values for index in batch]).to(model.device),
                max_new_tokens=max(requests[index].max_new_tokens for index in batch),
                do_sample=False,
                streamer=clock,
            )
        times = [moment - start for moment in clock.times[1:]]
        width = input_ids.shape[1]
        for index, row in zip(batch, output[:, width:].tolist()):
            run.answers[index] = answer_tokens(row, stop_ids, requests[index].max_new_tokens)
            run.token_times[index] = times[: len(run.answers[index])]
        for step, moment in enumerate(times[1:], start=2):  # the decoding steps after the prefill's token
            run.step_rows.append(sum(len(run.answers[index]) >= step for index in batch))
            run.step_waiting.append(bool(queue) or (arrived < len(requests) and arrivals[arrived] <= moment))
        run.peak_cache_positions = max(run.peak_cache_positions, len(batch) * (width + len(times) - 1))
    return run


def drain(handle) -> tuple[int, bool]:
    """Tokens the request's stream holds now, and whether the stream has ended."""
    count = 0
    while True:
        try:
            token = handle.next_token(timeout=0)
        except TimeoutError:
            return count, False
        if token is None:
            return count, True
        count += 1


def serve_engine(engine: Engine, requests: list[Request], arrivals: list[float]) -> Run:
    """`engine` (a fresh one) stepped from this thread: requests submitted as they arrive, each step's tokens stamped
    with the step's end."""
    run = Run([[] for _ in requests], [[] for _ in requests])
    handles, arrived, start = {}, 0, time.perf_counter()
    while arrived < len(requests) or handles:
        now = time.perf_counter() - start
        while arrived < len(requests) and arrivals[arrived] <= now:
            request = requests[arrived]
            inputs = {"input_ids": request.input_ids[None], "pixel_values": request.pixel_values}
            handles[arrived] = engine.submit(inputs, max_new_tokens=request.max_new_tokens)
            arrived += 1
        if not handles:
            continue  # spin until the next arrival
        decode_steps, decoded_rows = engine.stats["decode_steps"], engine.stats["decoded_rows"]
        engine.step()
        stamp = time.perf_counter() - start
        if engine.stats["decode_steps"] > decode_steps:
            run.step_rows.append(engine.stats["decoded_rows"] - decoded_rows)
            run.step_waiting.append(engine.num_pending > 0 or (arrived < len(requests) and arrivals[arrived] <= stamp))
        for index, handle in list(handles.items()):
            count, ended = drain(handle)
            run.token_times[index] += [stamp] * count
            if ended:
                run.answers[index] = handle.result().token_ids
                del handles[index]
    run.peak_cache_positions = engine.stats["peak_cache_positions"]
    run.preempted = engine.stats["preempted"]
    run.prefix_cache_bytes = engine.prefix_cache.nbytes
    return run


def runners_for(names, model, requests, arrivals, predictor, schedulers) -> dict[str, Callable[[], Run]]:
    """A function serving the trace per variant (see the module docstring); the engine variants build a fresh
    engine per run."""
    batch, budget = ENGINE_CONFIG.max_batch_size, ENGINE_CONFIG.max_batch_tokens
    static = {"sequential": (1, None), "static": (batch, budget), "generate_all": (len(requests), None)}

    def runner(name: str) -> Callable[[], Run]:
        if name in static:
            return lambda: serve_static(model, requests, arrivals, *static[name])
        if name == ONE_BATCH:
            longest = max(len(request.input_ids) + request.max_new_tokens for request in requests)
            config = dataclasses.replace(
                ENGINE_CONFIG,
                max_batch_size=len(requests),
                max_batch_tokens=len(requests) * longest,
                prefill_chunk_tokens=None,
            )
            return lambda: serve_engine(Engine(model, config), requests, arrivals)
        chosen = predictor if "predictor" in name else None
        return lambda: serve_engine(Engine(model, ENGINE_CONFIG, chosen, schedulers.get(name)), requests, arrivals)

    return {name: runner(name) for name in names}


# ---- measurements --------------------------------------------------------------------------------------------


def train_predictor(model, requests: list[Request]) -> tuple[dict[str, LengthPredictor], list[LengthRecord]]:
    """The engine's log of `requests` (all at t = 0), and the LSTM trained on it with the cut-off lengths treated as
    censored and, for comparison, as exact."""
    engine = Engine(model, dataclasses.replace(ENGINE_CONFIG, log_prompt_tokens=LOG_PROMPT_TOKENS))
    serve_engine(engine, requests, [0.0] * len(requests))
    records = list(engine.length_log)
    predictors = {}
    for name, censoring in (("censored", True), ("as_exact", False)):
        torch.manual_seed(0)
        predictors[name] = LengthPredictor(LengthPredictorConfig(vocab_size=model.config.vocab_size))
        predictors[name].fit(records, epochs=12, censoring=censoring)
    return predictors, records


def predictor_errors(predictors: dict[str, LengthPredictor], train: list[LengthRecord], held_out: list) -> dict:
    """MAE in tokens on the held-out records (all, and those not cut off) of each predictor, the untrained fallback
    (`max_new_tokens`) and the median training length (capped at each request's `max_new_tokens`)."""
    median = statistics.median(record.generated_length for record in train)
    finished = [record for record in held_out if not record.is_censored]
    fallback = LengthPredictor(LengthPredictorConfig(vocab_size=next(iter(predictors.values())).config.vocab_size))
    errors = {}
    for name, records in (("all", held_out), ("not_cut_off", finished)):
        errors[name] = {
            **{f"lstm_{key}": predictor.mean_absolute_error(records) for key, predictor in predictors.items()},
            "fallback_max_new_tokens": fallback.mean_absolute_error(records),
            "median_training_length": statistics.mean(
                abs(min(median, r.max_new_tokens) - r.generated_length) for r in records
            ),
            "records": len(records),
        }
    return {
        "train_records": len(train),
        "train_cut_off_fraction": sum(record.is_censored for record in train) / len(train),
        "held_out_cut_off_fraction": 1 - len(finished) / len(held_out),
        "median_training_length": median,
        "mae_tokens": errors,
    }


def cache_memory(model, request: Request) -> dict:
    """Bytes per cached position (all layers): the MLA latent and rotated key (measured on the model's cache), a
    per-head K/V cache of the same heads (computed), transformers' `DeepseekV3ForCausalLM` of the same text
    configuration (measured)."""
    config = model.config
    input_ids = request.input_ids[None].to(model.device)
    with torch.no_grad():
        cache = model(input_ids=input_ids, pixel_values=request.pixel_values.to(model.device), use_cache=True).cache
    latent = sum(tensor.nbytes for pair in cache_layers(cache) for tensor in pair) / input_ids.shape[1]
    element = next(model.parameters()).element_size()
    head_width = config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim
    per_head = config.num_hidden_layers * config.num_key_value_heads * head_width * element
    fields = (
        "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "n_shared_experts", "n_routed_experts", "n_group", "topk_group",
        "num_experts_per_tok", "first_k_dense_replace", "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim",
        "qk_nope_head_dim", "v_head_dim", "max_position_embeddings",
    )  # fmt: skip
    upstream = DeepseekV3ForCausalLM(DeepseekV3Config(**{name: getattr(config, name) for name in fields})).eval()
    with torch.no_grad():
        upstream_cache = upstream(input_ids=input_ids.cpu(), use_cache=True).past_key_values
    upstream_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in upstream_cache.layers)
    return {
        "mla_latent_bytes_per_token": latent,
        "per_head_kv_bytes_per_token": per_head,
        "upstream_transformers_bytes_per_token": upstream_bytes / input_ids.shape[1],
        "per_head_over_mla": per_head / latent,
    }


def run_figures(run: Run, arrivals: list[float], bytes_per_position: float) -> dict:
    waiting = [rows for rows, waited in zip(run.step_rows, run.step_waiting) if waited]
    return {
        **latency_figures(arrivals, run.token_times),
        "rows_per_step_mean": statistics.mean(run.step_rows) if run.step_rows else None,
        "rows_per_step_cv": variation(run.step_rows),
        "rows_per_step_cv_while_waiting": variation(waiting),
        "steps_while_waiting": len(waiting),
        "decoding_steps": len(run.step_rows),
        "peak_cache_bytes": run.peak_cache_positions * bytes_per_position,
        "preempted": run.preempted,
        "prefix_cache_bytes": run.prefix_cache_bytes,
    }


def medians(rows: list[dict]) -> dict:
    """Each figure's median over the rounds (over those where it is defined)."""
    result = {}
    for key in rows[0]:
        values = [row[key] for row in rows if row[key] is not None]
        result[key] = statistics.median(values) if values else None
    return result


def time_phase(
    runners: dict[str, Callable[[], Run]], arrivals: list[float], args, bytes_per_position: float
) -> tuple[dict, dict[str, Run]]:
    """Interleaved rounds of every runner on one trace; the medians of each variant's figures over the kept rounds,
    and each variant's last run."""
    names = tuple(runners)
    runs = {name: [] for name in names}

    def make_step(name):
        def step() -> float:
            runs[name].append(runners[name]())
            return float(sum(map(len, runs[name][-1].answers)))

        return step

    steps = {name: make_step(name) for name in names}
    rounds, _ = time_variants(steps, names, args.repeats, args.budget_s, args.device, time.perf_counter())
    kept = kept_rounds(rounds)
    kept_index = [index for index, round_ in enumerate(rounds) if any(round_ is k for k in kept)]
    summary = {}
    for name in names:
        timed = runs[name][1:]  # the first run is the harness's warm-up
        summary[name] = medians([run_figures(timed[index], arrivals, bytes_per_position) for index in kept_index])
    phase = {
        "rounds_run": len(rounds),
        "rounds_kept": len(kept),
        "only_clean_rounds_kept": all(round_["clean"] for round_ in kept),
        "rounds": rounds,
        "variants": summary,
    }
    return phase, {name: runs[name][-1] for name in names}


def equal_share(runs: dict[str, Run], reference: str) -> dict[str, float]:
    """Each variant's share of answers equal to `reference`'s (float rounding in batched matmuls may flip a
    near-tie)."""
    answers = runs[reference].answers
    return {name: statistics.mean(a == b for a, b in zip(run.answers, answers)) for name, run in runs.items()}


def answer_quality(processor, requests: list[Request], answers: list[list[int]]) -> dict:
    """Per request kind: exact match of the decoded answer with the reference, and the answer lengths in tokens."""
    quality = {}
    for kind in ("question", "caption"):
        chosen = [(r, a) for r, a in zip(requests, answers) if r.kind == kind]
        texts = processor.batch_decode([a for _, a in chosen], skip_special_tokens=True)
        lengths = [len(a) for _, a in chosen]
        quality[kind] = {
            "requests": len(chosen),
            "exact_match": statistics.mean(t.strip() == r.reference for t, (r, _) in zip(texts, chosen)),
            "tokens_min": min(lengths),
            "tokens_median": statistics.median(lengths),
            "tokens_max": max(lengths),
            "cut_off_fraction": statistics.mean(len(a) >= r.max_new_tokens for r, a in chosen),
        }
    return quality


def plot(online: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for axis, measure, title in zip(axes, ("ttft", "itl"), ("time to first token", "inter-token latency")):
        for variant in ONLINE_VARIANTS:
            rows = [phase["variants"][variant] for phase in online.values()]
            throughput = [row["tokens_per_s"] for row in rows]
            (line,) = axis.plot(throughput, [row[f"{measure}_p50_s"] for row in rows], marker="o", label=variant)
            axis.plot(throughput, [row[f"{measure}_p99_s"] for row in rows], marker="^", ls="--", c=line.get_color())
        axis.set(title=f"{title}: p50 (solid), p99 (dashed)", xlabel="throughput (tokens/s)", ylabel="seconds")
        axis.set_yscale("log")
    axes[0].legend(fontsize=8)
    fractions = ", ".join(str(fraction) for fraction in RATE_FRACTIONS)
    figure.suptitle(f"Poisson arrivals at {fractions} x static batching's capacity (one point per rate)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def print_table(title: str, variants: dict) -> None:
    print(f"\n{title}")
    header = f"{'variant':24} {'tok/s':>7} {'TTFT p50':>8} {'p99':>7} {'ITL p50':>8} {'p99':>7} {'lat p99':>7}"
    print(header + f" {'rows/step':>9} {'cv':>5} {'peak KiB':>8}")

    def cell(value, scale=1.0, digits=3):
        return "-" if value is None else f"{value * scale:.{digits}f}"

    for name, row in variants.items():
        print(
            f"{name:24} {row['tokens_per_s']:>7.1f} {cell(row['ttft_p50_s']):>8} {cell(row['ttft_p99_s']):>7} "
            f"{cell(row['itl_p50_s']):>8} {cell(row['itl_p99_s']):>7} {cell(row['latency_p99_s']):>7} "
            f"{cell(row['rows_per_step_mean'], digits=1):>9} {cell(row['rows_per_step_cv'], digits=2):>5} "
            f"{row['peak_cache_bytes'] / 1024:>8.0f}"
        )


def headline_figures(at_t0: dict, poisson: dict) -> tuple[dict, list[dict]]:
    """The engines' ratios to the baselines, and the headline: the targets of the module docstring, each marked met
    or not."""
    variants = at_t0["variants"]
    best = max(BASELINES, key=lambda name: variants[name]["tokens_per_s"])
    middle = poisson[str(RATE_FRACTIONS[1])]["variants"]
    ratios = {}
    for name in ENGINES:
        ratios[f"{name}_tokens_per_s_over_{best}"] = variants[name]["tokens_per_s"] / variants[best]["tokens_per_s"]
        ratios[f"{name}_p99_ttft_over_static_middle_rate"] = (
            middle[name]["ttft_p99_s"] / middle["static"]["ttft_p99_s"]
        )
    ratios[f"{ONE_BATCH}_tokens_per_s_over_generate_all"] = (
        variants[ONE_BATCH]["tokens_per_s"] / variants["generate_all"]["tokens_per_s"]
    )
    full = "engine_predictor_bandit"
    targets = [
        (f"{full}_tokens_per_s_over_{best}", ratios[f"{full}_tokens_per_s_over_{best}"], 3.0, True),
        (f"engine_tokens_per_s_over_{best}", ratios[f"engine_tokens_per_s_over_{best}"], 3.0, True),
        (f"{full}_p99_ttft_over_static_middle_rate", ratios[f"{full}_p99_ttft_over_static_middle_rate"], 0.5, False),
        (f"{full}_rows_per_step_cv_at_t0", variants[full]["rows_per_step_cv"], 0.05, False),
        (
            f"{full}_rows_per_step_cv_at_t0_while_waiting",
            variants[full]["rows_per_step_cv_while_waiting"],
            0.05,
            False,
        ),
    ]
    # a coefficient of variation is undefined when fewer than two steps count
    headline = headline_entries([target for target in targets if target[1] is not None])
    for entry in headline:
        higher = entry["higher_is_better"]
        entry["met"] = entry["value"] >= entry["target"] if higher else entry["value"] <= entry["target"]
        bound = f"{'>=' if higher else '<='} {entry['target']}"
        print(f"{entry['name']}: {entry['value']:.3f} (target {bound}): {'met' if entry['met'] else 'NOT met'}")
    return ratios, headline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--requests", type=int, default=96, help="requests all at t = 0 (default: %(default)s)")
    parser.add_argument("--online-requests", type=int, default=200, help="requests per arrival rate")
    parser.add_argument("--repeats", type=int, default=5, help="clean rounds wanted per phase (default: %(default)s)")
    parser.add_argument("--budget-s", type=float, default=150.0, help="stop adding rounds to a phase after this")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU (default: %(default)s)")
    parser.add_argument("--retrain", action="store_true", help="train the serving model again")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny model and traces, writes under /tmp")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.requests, args.online_requests, args.repeats, args.budget_s = 24, 24, 1, 20.0
    output = args.output or (QUICK_OUTPUT if args.quick else RESULTS_PATH)
    if args.quick and output.resolve() == RESULTS_PATH:
        parser.error(f"--quick figures are no result: write them elsewhere than {RESULTS_PATH}")
    plot_path = output.with_suffix(".png") if args.quick else PLOT_PATH
    started = time.perf_counter()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)

    settings = ModelSettings(num_images=1000, steps=250) if args.quick else ModelSettings()
    data = scenes(settings)
    model_dir = QUICK_MODEL_DIR if args.quick else MODEL_DIR
    model, processor, model_info = serving_model(settings, data, model_dir, args.retrain, args.device)
    test = data["test"]
    if max(args.requests, args.online_requests) > len(test):
        parser.error(f"the test split has {len(test)} images: ask for at most that many requests")
    offline = build_requests(processor, test.select(range(args.requests)), seed=1)
    print(f"Training the length predictor on the engine's log of {len(data['validation'])} validation requests")
    predictors, log = train_predictor(model, build_requests(processor, data["validation"], seed=2))
    memory = cache_memory(model, offline[0])
    bytes_per_position = memory["mla_latent_bytes_per_token"]
    schedulers = {
        name: SelfTuningScheduler(BANDIT_SETTINGS, LATENCY_BOUND_S, epoch_steps=4)
        for name in ("engine_bandit", "engine_predictor_bandit")
    }

    at_zero = [0.0] * len(offline)
    runners = runners_for(OFFLINE_VARIANTS, model, offline, at_zero, predictors["censored"], schedulers)
    print(f"All {len(offline)} requests at t = 0: {len(runners)} variants, interleaved rounds")
    at_t0, runs = time_phase(runners, at_zero, args, bytes_per_position)
    at_t0["answers_equal_to_sequential"] = equal_share(runs, "sequential")
    print_table("All requests at t = 0 (medians over the kept rounds)", at_t0["variants"])
    sequential = runs["sequential"].answers
    held_out = [
        LengthRecord(len(r.input_ids), len(a), r.max_new_tokens, tuple(r.input_ids[-LOG_PROMPT_TOKENS:].tolist()))
        for r, a in zip(offline, sequential)
    ]
    predictor_info = predictor_errors(predictors, log, held_out)
    print(f"Length predictor MAE (tokens) on the {len(held_out)} requests above: {predictor_info['mae_tokens']}")

    capacity = at_t0["variants"]["static"]["requests_per_s"]
    rows = test.select(random.Random(10).sample(range(len(test)), args.online_requests))
    requests = build_requests(processor, rows, seed=20)
    poisson = {}
    for index, fraction in enumerate(RATE_FRACTIONS):
        rate = fraction * capacity
        arrivals = poisson_arrivals(len(requests), rate, seed=30 + index)
        runners = runners_for(ONLINE_VARIANTS, model, requests, arrivals, predictors["censored"], schedulers)
        print(f"\nPoisson arrivals, {rate:.1f} requests/s ({fraction} x static's {capacity:.1f}): {len(requests)}")
        phase, runs = time_phase(runners, arrivals, args, bytes_per_position)
        phase.update(rate_per_s=rate, fraction_of_static_capacity=fraction)
        phase["answers_equal_to_static"] = equal_share(runs, "static")
        poisson[str(fraction)] = phase
        print_table(f"{rate:.1f} requests/s (medians over the kept rounds)", phase["variants"])

    print()
    ratios, headline = headline_figures(at_t0, poisson)
    positions = statistics.mean(len(r.input_ids) + len(a) for r, a in zip(offline, sequential))
    memory["mean_positions_per_request_at_t0"] = positions
    memory["mla_latent_bytes_per_request"] = positions * memory["mla_latent_bytes_per_token"]
    memory["per_head_kv_bytes_per_request"] = positions * memory["per_head_kv_bytes_per_token"]
    memory["peak_cache_bytes_at_t0"] = {name: row["peak_cache_bytes"] for name, row in at_t0["variants"].items()}
    plot(poisson, plot_path)
    result = {
        **benchmark_record(__file__, args.device),
        "quick": args.quick,
        "planted": "nothing: a trained model; answer lengths are its own greedy outputs",
        "model": {**model_info, "config": model.config.to_diff_dict()},
        "answer_quality": answer_quality(processor, offline, sequential),
        "settings": {
            "engine": dataclasses.asdict(ENGINE_CONFIG),
            "static": {
                "max_batch_size": ENGINE_CONFIG.max_batch_size,
                "max_batch_tokens": ENGINE_CONFIG.max_batch_tokens,
            },
            "bandit_settings": [dataclasses.asdict(setting) for setting in BANDIT_SETTINGS],
            "latency_bound_s": LATENCY_BOUND_S,
            "max_new_tokens_choices": MAX_NEW_TOKENS_CHOICES,
            "caption_share": CAPTION_SHARE,
            "rate_fractions_of_static_capacity": RATE_FRACTIONS,
            "requests_at_t0": len(offline),
            "requests_per_rate": args.online_requests,
            "threads": args.threads,
        },
        "at_t0": at_t0,
        "poisson": poisson,
        "predictor": predictor_info,
        "bandit": {
            name: {
                "best_setting": dataclasses.asdict(scheduler.settings[scheduler.bandit.best_arm()]),
                "counts": scheduler.bandit.counts,
            }
            for name, scheduler in schedulers.items()
        },
        "memory": memory,
        "ratios": ratios,
        "headline": headline,
        "plot": str(plot_path.relative_to(ROOT)) if plot_path.is_relative_to(ROOT) else str(plot_path),
    }
    write_results(result, output, started)


if __name__ == "__main__":
    main()
