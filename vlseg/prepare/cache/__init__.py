"""The preprocessing cache."""
