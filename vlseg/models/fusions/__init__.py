"""Fusions of text and image."""
