"""The data files under `tests/fixtures/` and their loaders (see its README).

Standard library only, so the self-containment test can load every fixture in a fresh interpreter in well under a
second and watch which files it opens.
"""

import json
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures"
# the published config of the 671B DeepSeek-V3 (Hub repository deepseek-ai/DeepSeek-V3), no weights
OFFICIAL_CONFIG = FIXTURES / "deepseek-v3-config.json"


def load_official_config_dict() -> dict:
    """The official DeepSeek-V3 `config.json` as a dict."""
    with open(OFFICIAL_CONFIG, encoding="utf-8") as handle:
        return json.load(handle)
