"""The chat page that `deepseekv3 serve` answers on `GET /`, driven in a real browser (Debian's Chromium, through
playwright) against a server on 127.0.0.1 serving a tiny saved model: a question about an image from the built-in
shapes data streams the API's answer, audio clips (resampled in the page to 16 kHz) reach the model, Stop cancels
the request on the server, errors (400, 413, a dropped connection) read clearly, a second turn carries the first,
the API key stays optional for the page itself, and the page works by keyboard alone on a phone-sized screen.

They need `apt-get install -y chromium` and the pinned `playwright` (`make test` installs it; `playwright install`
is not used). Without them the tests are skipped, unless `CI=true` (or `DEEPSEEKV3_REQUIRE_SYSTEM_DATA=1`, which
`.ci/run` sets), where a missing browser fails the run. `DEEPSEEKV3_CHAT_SCREENSHOT=PATH` also copies the
screenshot of a conversation with an image to PATH (the tiny untrained model's answers are noise).
"""

import base64
import importlib.util
import io
import json
import os
import re
import shutil
import time
import wave

import httpx
import numpy as np
import pytest
from PIL import Image
from serving_helpers import served_processor_and_model, wait_until

from deepseekv3.data import draw_shapes, synthesize_tones
from deepseekv3.data.shapes import sample_shapes
from deepseekv3.serving import Engine, EngineConfig
from deepseekv3.serving import server as server_module
from deepseekv3.serving.launch import build_server
from deepseekv3.serving.server import ChatServer, ServerConfig

CHROMIUM = "/usr/bin/chromium"
MODEL_NAME = "tiny-chat"
MAX_BYTES = 64 * 1024  # small, so an ordinary picture is over it (413)
MAX_TOKENS = 96  # the tiny model's context is 128 positions
API_KEY = "page-key-0123"
COMPLETIONS = "/v1/chat/completions"
_REQUIRED = (
    os.environ.get("CI", "").lower() in ("true", "1") or os.environ.get("DEEPSEEKV3_REQUIRE_SYSTEM_DATA") == "1"
)


def _missing_browser() -> str | None:
    if importlib.util.find_spec("playwright") is None:
        return "the playwright package is not installed (pip install -c constraints.txt playwright, or make test)"
    if not os.access(CHROMIUM, os.X_OK):
        return f"{CHROMIUM} is not installed (apt-get install -y chromium)"
    return None


@pytest.fixture(scope="module")
def browser():
    reason = _missing_browser()
    if reason is not None:
        if _REQUIRED:
            pytest.fail(f"{reason}; CI needs the browser")
        pytest.skip(reason)
    from playwright.sync_api import expect as playwright_expect
    from playwright.sync_api import sync_playwright

    playwright_expect.set_options(timeout=30_000)
    with sync_playwright() as playwright:
        # the fake microphone plays a beep and is granted without a prompt
        args = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]
        running = playwright.chromium.launch(executable_path=CHROMIUM, args=args)
        yield running
        running.close()


@pytest.fixture(scope="module")
def processor_and_model():
    return served_processor_and_model(audio_max_frames=64)  # 0.64 s: room for a short recording


@pytest.fixture(scope="module")
def server(tmp_path_factory, processor_and_model):
    """`deepseekv3 serve`'s server (`build_server`) on a saved tiny model, in this process: the tests read its
    engine's counters."""
    processor, model = processor_and_model
    model_dir = tmp_path_factory.mktemp("saved") / "model"
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    config = ServerConfig(port=0, model_name=MODEL_NAME, max_request_bytes=MAX_BYTES, max_tokens=MAX_TOKENS)
    with build_server(model_dir, config, EngineConfig()) as running:
        yield running


def expect(target):
    """playwright's `expect` (imported here: playwright is optional until the `browser` fixture has checked it)."""
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(target)


class ChatPage:
    """A fresh browser page on the chat page, recording the bodies it posts to the API."""

    def __init__(self, browser, url: str, viewport=(720, 560), has_model: bool = True):
        self.context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]})
        self.page = self.context.new_page()
        self.page.set_default_timeout(30_000)
        self.bodies: list[dict] = []
        self.page.on("request", self._record)
        self.page.goto(url)
        if has_model:  # the model name came from /v1/models
            self.wait_for_model()

    def _record(self, request) -> None:
        if request.method == "POST" and request.url.endswith(COMPLETIONS):
            self.bodies.append(json.loads(request.post_data))

    def wait_for_model(self) -> None:
        expect(self.page.locator("#status")).to_have_text(f"Model: {MODEL_NAME}")

    def settings(self, **values) -> None:
        """Opens the settings, fills them by their labels (`max_tokens=`, `temperature=`, `system=`, `api_key=`)
        and closes them."""
        if self.page.locator("#settings").get_attribute("open") is None:
            self.page.get_by_text("Settings", exact=True).click()
        labels = {"max_tokens": "Max tokens", "temperature": "Temperature (0 = greedy)", "system": "System prompt"}
        labels["api_key"] = "API key"
        for name, value in values.items():
            self.page.get_by_label(labels[name], exact=True).fill(str(value))
        self.page.keyboard.press("Escape")
        expect(self.page.get_by_label("Max tokens")).to_be_hidden()

    def new_conversation(self) -> None:
        self.page.get_by_text("Settings", exact=True).click()
        self.page.get_by_role("button", name="New conversation").click()
        expect(self.page.locator(".turn")).to_have_count(0)

    def ask(self, text: str) -> None:
        self.page.get_by_label("Message", exact=True).fill(text)
        self.page.get_by_role("button", name="Send").click()

    def wait_for_answer(self, count: int) -> str:
        """Waits for the `count`-th answer to end; returns its text. (Locator waits: the page's Content Security
        Policy, in force here, forbids the `eval` that `wait_for_function` needs.)"""
        expect(self.page.locator(".turn.assistant")).to_have_count(count)
        expect(self.page.locator(".cursor")).to_have_count(0)
        return self.page.locator(".turn.assistant .text").nth(count - 1).text_content()

    def errors(self) -> list[str]:
        return self.page.locator(".error").all_text_contents()

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def chat(browser, server):
    page = ChatPage(browser, server.url)
    yield page
    page.close()


def api_answer(server: ChatServer, body: dict) -> str:
    """The server's non-streamed answer to `body`."""
    response = httpx.post(server.url + COMPLETIONS, json={**body, "stream": False}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def png_file(path, image: Image.Image) -> str:
    image.save(path, format="PNG")
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def wav_file(path, samples: np.ndarray, rate: int) -> None:
    pcm = np.clip(np.round(samples * 32768), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(rate)
        writer.writeframes(pcm.tobytes())


def read_wav(data: str) -> tuple[int, int, np.ndarray]:
    """Rate, channels and samples (float, as the server reads them) of a base64 WAV."""
    with wave.open(io.BytesIO(base64.b64decode(data))) as reader:
        frames = reader.readframes(reader.getnframes())
        rate, channels = reader.getframerate(), reader.getnchannels()
    return rate, channels, np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768


def tone_clip(rate: int) -> np.ndarray:
    """A quarter second with a mid then a high tone."""
    num_samples = rate // 4
    tones = [{"pitch": "mid", "start": 0, "end": num_samples // 2}]
    tones.append({"pitch": "high", "start": num_samples // 2, "end": num_samples})
    return synthesize_tones(tones, num_samples, rate)


def test_image_question_streams_the_api_answer(chat, server, tmp_path):
    scene = sample_shapes(1, seed=3, image_size=32)[0]
    data_url = png_file(tmp_path / "shapes.png", draw_shapes(scene["objects"], 32))
    chat.settings(max_tokens=12, temperature=0)
    chat.page.locator("#image-input").set_input_files(tmp_path / "shapes.png")
    chat.page.get_by_role("img", name="preview of shapes.png").wait_for()
    chat.ask(scene["question"])
    shown = chat.wait_for_answer(1)

    content = [{"type": "image_url", "image_url": {"url": data_url}}, {"type": "text", "text": scene["question"]}]
    expected = {"model": MODEL_NAME, "messages": [{"role": "user", "content": content}], "stream": True}
    expected.update(max_tokens=12, temperature=0)
    assert chat.bodies == [expected]
    answer = api_answer(server, expected)
    assert answer and shown == answer
    assert chat.errors() == []
    assert chat.page.locator(".turn.user img").count() == 1  # the question keeps its picture

    screenshot = chat.page.screenshot(path=tmp_path / "chat_page.png")
    assert screenshot.startswith(b"\x89PNG") and len(screenshot) < 100_000
    if os.environ.get("DEEPSEEKV3_CHAT_SCREENSHOT"):
        shutil.copyfile(tmp_path / "chat_page.png", os.environ["DEEPSEEKV3_CHAT_SCREENSHOT"])


def test_audio_is_sent_as_16_khz_wav_and_answered(chat, server, tmp_path):
    chat.settings(max_tokens=8)
    # a 16 kHz clip passes through the page unchanged: the answer is the API's to the same clip
    wav_file(tmp_path / "tones16k.wav", tone_clip(16000), 16000)
    chat.page.locator("#audio-input").set_input_files(tmp_path / "tones16k.wav")
    chat.page.get_by_text("tones16k.wav (0.3 s)").wait_for()
    chat.ask("What do you hear?")
    shown = chat.wait_for_answer(1)
    part = chat.bodies[0]["messages"][0]["content"][0]
    assert part["type"] == "input_audio" and part["input_audio"]["format"] == "wav"
    rate, channels, samples = read_wav(part["input_audio"]["data"])
    original = read_wav(base64.b64encode((tmp_path / "tones16k.wav").read_bytes()).decode())[2]
    assert (rate, channels) == (16000, 1) and np.array_equal(samples, original)
    assert shown == api_answer(server, chat.bodies[0])

    # a 44.1 kHz stereo clip is resampled in the page to 16 kHz mono
    stereo = np.stack([tone_clip(44100), tone_clip(44100)], axis=1)
    pcm = np.round(stereo * 32767).astype("<i2")
    with wave.open(str(tmp_path / "tones44k.wav"), "wb") as writer:
        writer.setnchannels(2)
        writer.setsampwidth(2)
        writer.setframerate(44100)
        writer.writeframes(pcm.tobytes())
    chat.new_conversation()
    chat.page.locator("#audio-input").set_input_files(tmp_path / "tones44k.wav")
    chat.page.get_by_text("tones44k.wav (0.3 s)").wait_for()
    chat.ask("And now?")
    chat.wait_for_answer(1)
    assert chat.errors() == []
    assert len(chat.bodies[1]["messages"]) == 1  # a new conversation
    rate, channels, resampled = read_wav(chat.bodies[1]["messages"][0]["content"][0]["input_audio"]["data"])
    assert (rate, channels) == (16000, 1) and abs(len(resampled) - len(original)) <= 1
    assert np.abs(resampled[: len(original)] - original[: len(resampled)]).max() < 0.05

    # a recording from the (fake) microphone goes the same way
    chat.new_conversation()
    record = chat.page.get_by_role("button", name="Record", exact=True)
    record.click()
    chat.page.get_by_role("button", name="Stop recording").wait_for()
    chat.page.wait_for_timeout(250)
    chat.page.get_by_role("button", name="Stop recording").click()
    chat.page.get_by_text("recording 1").wait_for()
    expect(chat.page.locator(".attachment audio")).to_have_count(1)
    assert record.get_attribute("aria-pressed") == "false"
    chat.settings(max_tokens=4)
    chat.ask("And this?")
    chat.wait_for_answer(1)
    rate, channels, recorded = read_wav(chat.bodies[2]["messages"][0]["content"][0]["input_audio"]["data"])
    assert (rate, channels) == (16000, 1) and len(recorded) > 1000


def test_stop_cancels_the_request_on_the_server(chat, server, monkeypatch):
    step = server.engine.step

    def slow_step():  # a token every 50 ms, so the answer is still streaming when Stop is pressed
        time.sleep(0.05)
        return step()

    monkeypatch.setattr(server.engine, "step", slow_step)
    cancelled = server.engine.stats["cancelled"]
    chat.settings(max_tokens=MAX_TOKENS - 20)
    chat.ask("Tell me a long story.")
    answer = chat.page.locator(".turn.assistant .text").first
    expect(answer).to_have_text(re.compile(".", re.DOTALL))
    assert chat.page.locator(".cursor").count() == 1  # streaming: text shows before the answer ends
    chat.page.get_by_role("button", name="Stop").click()
    chat.page.get_by_text("(stopped)").wait_for()
    partial = answer.text_content()
    wait_until(lambda: server.engine.stats["cancelled"] == cancelled + 1)
    assert server.engine.num_active == server.engine.num_pending == 0
    assert chat.page.get_by_role("button", name="Send").is_enabled()
    assert chat.page.get_by_role("button", name="Stop").is_disabled()
    # the partial answer stays in the conversation
    monkeypatch.undo()
    chat.settings(max_tokens=4)
    chat.ask("Go on.")
    chat.wait_for_answer(2)
    assert chat.bodies[1]["messages"][1] == {"role": "assistant", "content": partial}


def test_errors_are_shown_readably(chat, server, tmp_path, monkeypatch):
    # 413: an ordinary picture is over the server's 64 KiB
    noise = np.random.default_rng(0).integers(0, 256, (160, 160, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "photo.png")
    chat.page.locator("#image-input").set_input_files(tmp_path / "photo.png")
    chat.ask("What is this?")
    error = chat.page.locator(".error").first
    error.wait_for()
    assert "too large" in error.text_content() and "HTTP 413" in error.text_content()
    assert f"exceeds the limit of {MAX_BYTES} bytes" in error.text_content()
    # the message goes back into the box, with its picture, to edit and resend
    assert chat.page.get_by_label("Message", exact=True).input_value() == "What is this?"
    assert chat.page.get_by_role("button", name="Remove photo.png").is_visible()
    chat.page.get_by_role("button", name="Remove photo.png").click()

    # 400: the server's own message
    chat.settings(temperature=5)
    chat.ask("Hello?")
    chat.page.locator(".error").nth(1).wait_for()
    assert "HTTP 400" in chat.errors()[1] and "temperature" in chat.errors()[1]
    chat.settings(temperature=0)

    # a connection dropped mid-answer
    send_event = server_module._Handler._send_event

    def drop_after_first_event(self, payload):
        send_event(self, payload)
        raise ConnectionResetError("dropped")

    monkeypatch.setattr(server_module._Handler, "_send_event", drop_after_first_event)
    chat.ask("Hello?")
    chat.page.locator(".error").nth(2).wait_for()
    assert "connection to the server was lost" in chat.errors()[2]
    monkeypatch.undo()
    chat.ask("Hello?")
    chat.wait_for_answer(4)
    assert len(chat.errors()) == 3
    assert chat.bodies[-1]["messages"] == [{"role": "user", "content": "Hello?"}]  # failed turns are not context


def test_a_second_turn_carries_the_first(chat, server):
    chat.settings(max_tokens=6, system="Answer briefly.")
    chat.ask("What is red?")
    first = chat.wait_for_answer(1)
    chat.ask("And blue?")
    second = chat.wait_for_answer(2)
    assert chat.bodies[1]["messages"] == [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is red?"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "And blue?"},
    ]
    assert second == api_answer(server, chat.bodies[1])


def test_keyboard_only_on_a_phone_sized_screen(browser, server):
    chat = ChatPage(browser, server.url, viewport=(375, 667))
    try:
        page = chat.page
        assert page.evaluate("document.documentElement.scrollWidth") <= 375  # no sideways scrolling
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.id") == "message"
        assert page.evaluate("getComputedStyle(document.activeElement).outlineStyle") == "solid"  # focus shows
        page.keyboard.type("line one")
        page.keyboard.press("Shift+Enter")
        page.keyboard.type("line two")
        assert chat.bodies == []
        page.keyboard.press("Enter")
        chat.wait_for_answer(1)
        assert chat.bodies[0]["messages"] == [{"role": "user", "content": "line one\nline two"}]
        assert page.evaluate("document.activeElement.id") == "message"
        order = []  # Stop is disabled between answers, so skipped
        for _ in range(5):
            page.keyboard.press("Tab")
            order.append(page.evaluate("document.activeElement.id || document.activeElement.textContent"))
        assert order == ["attach-image", "attach-audio", "record", "send", "Settings"]
        for control in ("Message", "System prompt", "Max tokens", "Temperature (0 = greedy)", "API key"):
            assert page.get_by_label(control, exact=True).count() == 1
        assert page.get_by_role("button", name="Send").bounding_box()["x"] + 10 <= 375
    finally:
        chat.close()


def test_the_page_loads_without_the_api_key_and_asks_for_it(browser, processor_and_model):
    processor, model = processor_and_model
    config = ServerConfig(port=0, model_name=MODEL_NAME, api_key=API_KEY)
    with ChatServer(Engine(model), processor, config) as server:
        page_response = httpx.get(server.url + "/")
        assert page_response.status_code == 200 and "text/html" in page_response.headers["content-type"]
        assert "connect-src 'self'" in page_response.headers["content-security-policy"]
        assert httpx.get(server.url + "/v1/models").status_code == 401
        chat = ChatPage(browser, server.url, has_model=False)
        try:
            chat.page.get_by_text("HTTP 401").wait_for()
            expect(chat.page.get_by_label("API key")).to_be_visible()  # the settings opened to ask for it
            chat.settings(api_key=API_KEY)  # loads the model on its change event
            chat.wait_for_model()
            chat.ask("Hi")
            chat.wait_for_answer(1)
            assert chat.errors() == []
            stored = chat.page.evaluate("JSON.stringify({...localStorage}) + JSON.stringify({...sessionStorage})")
            assert API_KEY not in stored and API_KEY not in chat.page.content()
        finally:
            chat.close()
