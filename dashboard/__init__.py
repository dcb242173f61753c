"""genai-lab dashboard package."""
