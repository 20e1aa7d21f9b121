"""Tiny, deterministic models, tokenizer and data built in code (no model hub)."""
