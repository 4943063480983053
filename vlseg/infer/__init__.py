"""Stage 3, infer."""
