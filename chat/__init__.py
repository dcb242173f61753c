"""genai-lab chat package."""
