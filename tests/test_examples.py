"""The examples run as their docstrings say (they are the README's code)."""

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_quickstart_runs_and_reloads(tmp_path):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart.py"), "--output", str(tmp_path / "model")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "logits (1, 19, 1000)" in result.stdout
    assert "reloaded DeepseekV3MultimodalModel" in result.stdout
    assert (tmp_path / "model" / "model.safetensors").exists()


def test_fine_tune_own_data_trains_a_saved_model_and_scores_generate(tmp_path):
    import json

    from PIL import Image

    from deepseekv3.data import build_text_corpus
    from deepseekv3.tokenization import train_tokenizer
    from deepseekv3.training.demo import DemoSettings, build_demo_model

    tokenizer = train_tokenizer(build_text_corpus(24, 12, 0), vocab_size=320)
    model, processor = build_demo_model(tokenizer, DemoSettings(hidden_size=48, num_hidden_layers=2))
    model.save_pretrained(tmp_path / "base")
    processor.save_pretrained(tmp_path / "base")
    lines = []
    for index, (name, color) in enumerate([("red", (220, 30, 30)), ("blue", (30, 30, 220))] * 4):
        Image.new("RGB", (24, 24), color).save(tmp_path / f"{index}.png")
        lines.append(json.dumps({"question": "what colour is it?", "answer": name, "image": f"{index}.png"}))
    (tmp_path / "mine.jsonl").write_text("\n".join(lines))
    command = [sys.executable, str(EXAMPLES / "fine_tune_own_data.py"), "--base", str(tmp_path / "base")]
    command += ["--dataset", str(tmp_path / "mine.jsonl"), "--steps", "2", "--output", str(tmp_path / "out")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "held-out exact match of greedy replies:" in result.stdout and "after 2 steps" in result.stdout
    assert (tmp_path / "out" / "model.safetensors").exists() and (tmp_path / "out" / "processor_config.json").exists()
