"""Stage 4, evaluate."""
