"""The canonical vocabulary and how prompts are read against it."""
