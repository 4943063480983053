"""Stage 2, train."""
