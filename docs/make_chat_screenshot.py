"""docs/chat_page.png, the chat page talking to the model `make demo` trained (outputs/demo/model).

Run from the repository root: .venv/bin/python docs/make_chat_screenshot.py [OUT.png]
Two turns: a shapes picture (built-in data, a test-split-like scene) with its question, then a tones clip.
"""

import sys
import tempfile
import wave
from pathlib import Path

import numpy as np
from playwright.sync_api import expect, sync_playwright

from deepseekv3.data import draw_shapes, synthesize_tones
from deepseekv3.data.shapes import sample_shapes
from deepseekv3.data.tones import sample_tones
from deepseekv3.serving import EngineConfig
from deepseekv3.serving.launch import build_server
from deepseekv3.serving.server import ServerConfig

out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/chat_page.png")
work = Path(tempfile.mkdtemp())
scene = sample_shapes(1, seed=7, image_size=32)[0]
draw_shapes(scene["objects"], 32).save(work / "shapes.png")
clip = sample_tones(1, seed=7, clip_seconds=1.0)[0]
pcm = np.round(synthesize_tones(clip["tones"], 16000, 16000) * 32767).astype("<i2")
with wave.open(str(work / "tones.wav"), "wb") as writer:
    writer.setnchannels(1), writer.setsampwidth(2), writer.setframerate(16000), writer.writeframes(pcm.tobytes())

config = ServerConfig(port=0, model_name="model")
with build_server("outputs/demo/model", config, EngineConfig()) as server, sync_playwright() as playwright:
    browser = playwright.chromium.launch(executable_path="/usr/bin/chromium")
    page = browser.new_page(viewport={"width": 640, "height": 720})
    page.goto(server.url)
    expect(page.locator("#status")).to_have_text("Model: model")
    for attach, path, question in (
        ("#image-input", work / "shapes.png", scene["question"]),
        ("#audio-input", work / "tones.wav", clip["question"]),
    ):
        page.locator(attach).set_input_files(path)
        expect(page.locator(".attachment")).to_have_count(1)
        page.get_by_label("Message", exact=True).fill(question)
        page.keyboard.press("Enter")
        expect(page.locator(".cursor")).to_have_count(0)
        print(question, "->", page.locator(".turn.assistant .text").last.text_content(), "| expected", end=" ")
        print(scene["answer"] if attach == "#image-input" else clip["answer"])
    page.locator("#message").blur()
    page.screenshot(path=out)
    browser.close()
print(out, out.stat().st_size, "bytes")
