"""genai-lab finetune package."""
