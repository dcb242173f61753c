"""`python -m core ...` is the same as the `genai-lab` command."""

from core.cli import main

main()
