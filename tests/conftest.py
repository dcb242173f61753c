"""Test-wide settings: never touch the network (also enforced by pytest-socket in pyproject)."""

import os

# Set before any test module imports huggingface_hub/transformers, which read these at import.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
