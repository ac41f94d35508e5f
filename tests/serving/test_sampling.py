"""Per-request sampling: greedy stays `generate`'s greedy, seeded sampling equals `generate(do_sample=True)` under the
same seed and does not depend on the rest of the batch, penalties follow OpenAI's formula, and the server takes
OpenAI's sampling fields and stop strings (through the official `openai` client), refusing bad values with 400."""

import openai
import pytest
import torch
from serving_helpers import generate_one, mixed_requests, served_processor_and_model, text_ids, tiny_media_model
from transformers.generation.logits_process import LogitsProcessor, LogitsProcessorList

from deepseekv3.serving import Engine, EngineConfig, SamplingParams
from deepseekv3.serving.sampling import OpenAIPenaltyLogitsProcessor, StopStrings, TokenSampler
from deepseekv3.serving.server import ChatServer, ServerConfig


@pytest.fixture(scope="module")
def model():
    return tiny_media_model()


def run(engine: Engine, requests: list[tuple], sampling: list[SamplingParams | None]) -> list[list[int]]:
    """Submits every request before the first step (so they share batches), steps until idle; the tokens of each."""
    handles = [engine.submit(prompt, n, sampling=params) for (prompt, n), params in zip(requests, sampling)]
    engine.run_until_idle()
    return [handle.result().token_ids for handle in handles]


def prompts(count: int, seed: int = 3, max_new_tokens: int = 12) -> list[tuple[list[int], int]]:
    generator = torch.Generator().manual_seed(seed)
    return [(text_ids(generator, 2 + index % 5), max_new_tokens) for index in range(count)]


# ---- the engine -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0, top_p=0.3, top_k=4, seed=1),  # greedy: the filters never move the argmax
        SamplingParams(temperature=1.0, top_k=1),  # one token left to draw
        SamplingParams(temperature=1.5, top_p=1e-6, seed=2),  # the most probable token alone reaches top_p
    ],
)
def test_greedy_and_single_token_sampling_equal_generate(model, params):
    requests = mixed_requests(8, seed=2)
    expected = [generate_one(model, inputs, n) for inputs, n in requests]
    engine = Engine(model, EngineConfig(max_batch_size=4))
    assert run(engine, requests, [params] * len(requests)) == expected


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": 1.5},
        {"temperature": 0.7, "top_k": 10, "top_p": 0.9},
        {"temperature": 1.0, "top_p": 0.5},
    ],
)
def test_seeded_sampling_equals_generate_with_the_same_seed(model, params):
    requests = prompts(3)
    expected = []
    for prompt, n in requests:
        torch.manual_seed(11)  # generate draws from the global generator, seeded as the request's own
        kwargs = {"top_k": 0, "top_p": 1.0, **params}  # generate's own defaults off: top_k 50
        output = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=True, **kwargs)
        expected.append(output[0, len(prompt) :].tolist())
    engine = Engine(model)
    assert run(engine, requests, [SamplingParams(seed=11, **params)] * len(requests)) == expected


def test_a_seeded_request_draws_the_same_tokens_alone_and_in_any_batch(model):
    target = prompts(1, seed=7, max_new_tokens=16)[0]
    params = SamplingParams(temperature=1.5, top_p=0.95, seed=123)
    alone = run(Engine(model), [target], [params])[0]
    assert run(Engine(model), [target], [params])[0] == alone  # a rerun reproduces it
    others = prompts(6, seed=8)
    others_sampling = [
        None,
        SamplingParams(temperature=1.5, seed=5),
        SamplingParams(temperature=0.9),  # unseeded
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.2, top_k=5, seed=5, frequency_penalty=1.0),
        SamplingParams(temperature=0, presence_penalty=1.5),
    ]
    greedy_expected = [generate_one(model, {"input_ids": torch.tensor([others[i][0]])}, others[i][1]) for i in (0, 3)]
    for position in (0, 3, 6):  # first, in the middle, last of the arrivals
        requests = [*others[:position], target, *others[position:]]
        sampling = [*others_sampling[:position], params, *others_sampling[position:]]
        engine = Engine(model, EngineConfig(max_batch_size=4))
        outputs = run(engine, requests, sampling)
        assert engine.stats["peak_batch_size"] == 4
        assert outputs[position] == alone
        rest = outputs[:position] + outputs[position + 1 :]
        assert [rest[0], rest[3]] == greedy_expected  # greedy rows of a sampling batch stay generate's greedy


def test_different_seeds_give_different_outputs(model):
    prompt = prompts(1, seed=9)[0]
    outputs = [run(Engine(model), [prompt], [SamplingParams(temperature=1.5, seed=seed)])[0] for seed in range(5)]
    assert len({tuple(output) for output in outputs}) > 1
    greedy = generate_one(model, {"input_ids": torch.tensor([prompt[0]])}, prompt[1])
    assert any(output != greedy for output in outputs)


def test_unseeded_generators_start_from_fresh_entropy():
    params = SamplingParams(temperature=1.0)
    seeds = {TokenSampler(params).generator.initial_seed() for _ in range(4)}
    assert len(seeds) == 4
    assert TokenSampler(SamplingParams(temperature=1.0, seed=42)).generator.initial_seed() == 42
    assert TokenSampler(SamplingParams(temperature=0, seed=42)).generator is None  # greedy draws nothing


def test_penalty_processor_follows_openai_formula():
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0], [0.5, -1.0, 0.0, 2.0, -3.0]])
    generated = torch.tensor([[1, 1, 3, 1], [4, 0, 4, 4]])
    penalized = OpenAIPenaltyLogitsProcessor(presence_penalty=0.5, frequency_penalty=0.25)(generated, scores)
    # row 0: token 1 three times (0.5 + 0.75), token 3 once (0.5 + 0.25); row 1: token 0 once, token 4 three times
    expected = torch.tensor([[1.0, 0.75, 3.0, 3.25, 5.0], [-0.25, -1.0, 0.0, 2.0, -4.25]])
    torch.testing.assert_close(penalized, expected, rtol=0, atol=1e-6)
    negative = OpenAIPenaltyLogitsProcessor(presence_penalty=-1.0, frequency_penalty=0.0)(generated[:, :0], scores)
    torch.testing.assert_close(negative, scores, rtol=0, atol=0)  # nothing generated yet: nothing penalized
    rewarded = OpenAIPenaltyLogitsProcessor(presence_penalty=-1.0, frequency_penalty=-0.5)(generated[:1], scores[:1])
    torch.testing.assert_close(rewarded, torch.tensor([[1.0, 4.5, 3.0, 5.5, 5.0]]), rtol=0, atol=1e-6)


class _OnGeneratedTokens(LogitsProcessor):
    """Runs `processor` on the generated tokens only (`generate` passes the prompt too; OpenAI counts the reply)."""

    def __init__(self, processor: LogitsProcessor, prompt_length: int):
        self.processor, self.prompt_length = processor, prompt_length

    def __call__(self, input_ids, scores):
        return self.processor(input_ids[:, self.prompt_length :], scores)


def test_penalties_in_the_engine_equal_generate_with_the_penalty_processor(model):
    requests = prompts(4, seed=4, max_new_tokens=16)
    params = SamplingParams(temperature=0, presence_penalty=0.8, frequency_penalty=0.6)
    expected, plain = [], []
    for prompt, n in requests:
        processor = OpenAIPenaltyLogitsProcessor(params.presence_penalty, params.frequency_penalty)
        processors = LogitsProcessorList([_OnGeneratedTokens(processor, len(prompt))])
        output = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, logits_processor=processors)
        expected.append(output[0, len(prompt) :].tolist())
        plain.append(generate_one(model, {"input_ids": torch.tensor([prompt])}, n))
    penalized = run(Engine(model, EngineConfig(max_batch_size=2)), requests, [params] * len(requests))
    assert penalized == expected
    assert penalized != plain  # the penalties changed some reply

    def repeats(replies: list[list[int]]) -> int:
        return sum(len(tokens) - len(set(tokens)) for tokens in replies)

    assert repeats(penalized) < repeats(plain)  # repeated tokens are penalized


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": "0.7"}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.0}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -2.01}, "frequency_penalty"),
        ({"seed": 1.5}, "seed"),
        ({"seed": 2**64}, "seed"),
    ],
)
def test_sampling_params_refuse_bad_values_naming_the_field(fields, name):
    with pytest.raises(ValueError, match=rf"^{name} \("):
        SamplingParams(**fields)


def test_sampling_params_accept_the_bounds():
    for params in (
        SamplingParams(temperature=2, top_p=1, top_k=0, presence_penalty=-2, frequency_penalty=2, seed=-(2**63)),
        SamplingParams(temperature=0, top_p=1e-9, top_k=1, presence_penalty=2, frequency_penalty=-2, seed=2**64 - 1),
    ):
        assert isinstance(params, SamplingParams)
    assert SamplingParams().is_greedy and SamplingParams().is_plain_greedy
    assert SamplingParams(temperature=0, presence_penalty=1).is_greedy
    assert not SamplingParams(temperature=0, presence_penalty=1).is_plain_greedy
    body = {"temperature": None, "top_p": 0.5, "messages": []}
    assert SamplingParams.from_request(body) == SamplingParams(top_p=0.5)


def test_stop_strings_cut_before_the_earliest_and_hold_back_their_beginnings():
    stop = StopStrings(["world", "lo w", "xyz"])
    assert stop.cut("hello world") == ("hel", True)  # "lo w" starts before "world"
    assert stop.cut("hello there") == ("hello there", False)
    # text without a stop string streams but for the end that may still grow into one
    stop = StopStrings(["world", "xyz"])
    assert stop.streamable("hello wor") == "hello "
    assert stop.streamable("say xy") == "say "
    assert stop.streamable("say yz.") == "say yz."
    assert StopStrings(["abcd", "cd!"]).streamable("xabc") == "x"  # the longest suffix that begins one is held
    assert StopStrings("end").strings == ("end",)
    assert not StopStrings(None) and StopStrings(None).streamable("abc") == "abc"


@pytest.mark.parametrize("stop", [["a", "b", "c", "d", "e"], [""], 7, ["a", 1]])
def test_stop_strings_refuse_bad_values(stop):
    with pytest.raises(ValueError, match="stop"):
        StopStrings(stop)


# ---- the server, through the official openai client --------------------------------------------------------------

MODEL_NAME = "tiny"
MESSAGES = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def processor_and_model():
    return served_processor_and_model()


@pytest.fixture(scope="module")
def server(processor_and_model):
    processor, model = processor_and_model
    config = ServerConfig(port=0, model_name=MODEL_NAME, max_tokens=16)
    with ChatServer(Engine(model), processor, config) as running:
        yield running


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60) as http:
        yield http


def reply(client: openai.OpenAI, stream: bool = False, **fields) -> tuple[str, str]:
    """The answer's text (the streamed deltas joined) and its finish reason."""
    request = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 16, **fields}
    if not stream:
        choice = client.chat.completions.create(**request).choices[0]
        return choice.message.content, choice.finish_reason
    chunks = [chunk for chunk in client.chat.completions.create(**request, stream=True) if chunk.choices]
    assert all(chunk.choices[0].finish_reason is None for chunk in chunks[:-1])
    return "".join(chunk.choices[0].delta.content or "" for chunk in chunks), chunks[-1].choices[0].finish_reason


def greedy_reply(processor, model) -> str:
    text = processor.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=text, return_tensors="pt", add_special_tokens=False)
    output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    return processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def stop_string_in(text: str) -> int:
    """Where in the second half of `text` a 4-character stop string starts at its first occurrence, with the two
    characters around its start clean too (no replacement character)."""
    for start in range(len(text) // 2, len(text) - 4):
        if "\ufffd" not in text[start - 1 : start + 4] and text.find(text[start : start + 4]) == start:
            return start
    raise AssertionError(f"no usable stop string in {text!r}")


@pytest.mark.parametrize("stream", [False, True])
def test_temperature_zero_through_the_client_equals_generate(client, processor_and_model, stream):
    expected = greedy_reply(*processor_and_model)
    assert reply(client, stream, temperature=0, seed=3)[0] == expected


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_cut_the_reply_before_them(client, processor_and_model, stream):
    full = greedy_reply(*processor_and_model)
    start = stop_string_in(full)
    string = full[start : start + 4]
    content, finish_reason = reply(client, stream, stop=string)
    assert (content, finish_reason) == (full[:start], "stop")
    # with several stop strings, the earliest occurrence wins; one that never occurs changes nothing
    earlier = full[start - 1 : start + 1]
    content, finish_reason = reply(client, stream, stop=["never in the reply", string, earlier])
    assert (content, finish_reason) == (full[: full.find(earlier)], "stop")
    assert reply(client, stream, stop=["never in the reply"])[0] == full


@pytest.mark.parametrize("stream", [False, True])
def test_seeded_sampling_through_the_client_reproduces(client, processor_and_model, stream):
    sampled = [reply(client, stream, temperature=1.5, top_p=0.95, seed=seed)[0] for seed in (1, 1, 2, 3, 4)]
    assert sampled[0] == sampled[1]
    assert len(set(sampled)) > 1
    assert any(text != greedy_reply(*processor_and_model) for text in sampled)


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"extra_body": {"top_k": -1}}, "top_k"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"seed": 1.5}, "seed"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": [""]}, "stop"),
    ],
)
def test_bad_sampling_values_get_400_naming_the_field(client, fields, name):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=4, **fields)
    assert caught.value.status_code == 400
    assert caught.value.body["message"].startswith(f"{name} ")
    assert caught.value.body["type"] == "invalid_request_error"
