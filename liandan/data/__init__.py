"""Data: read and validate JSONL (formats), render with the chat template (render), batch (batching)."""
