"""Test-wide settings and shared fixtures: never touch the network (also enforced by pytest-socket
in pyproject). Helpers that several test files need live here as fixtures, never imported from
another test file."""

import os

import pytest
import torch

# Set before any test module imports huggingface_hub/transformers, which read these at import.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

# Streamlit's AppTest runs a page script with its folder (dashboard/views/) first on sys.path,
# where the Chat page's module chat.py would shadow the `chat` package for any page that imports
# it (dashboard/resources.py does, for MiniLM). `streamlit run dashboard/app.py` puts dashboard/
# there instead, so only tests need the package imported first.
import chat  # noqa: F401


@pytest.fixture(scope="session")
def lora_adapter(tmp_path_factory):
    """A tiny LoRA adapter on tutor-base, made with peft (random B, so it changes the answers)."""
    from peft import LoraConfig, get_peft_model  # (peft is slow to import: only when used)
    from transformers import AutoModelForCausalLM  # after the offline settings above

    from core.lm.loader import resolve_model_path

    folder = tmp_path_factory.mktemp("adapter") / "lora"
    base = AutoModelForCausalLM.from_pretrained(
        resolve_model_path("tutor-base"), local_files_only=True, dtype=torch.float32
    )
    torch.manual_seed(0)
    config = LoraConfig(
        r=4,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "down_proj"],
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    get_peft_model(base, config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium through Playwright (`playwright install` cannot download browsers here);
    see tests/browser_support.py for the server side."""
    from tests.browser_support import CHROMIUM, CHROMIUM_ARGS

    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is missing (the Makefile's test target installs Debian chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield browser
        finally:
            browser.close()
