"""liandan (炼丹): fine-tune an LLM on your own machine, from JSONL to Ollama."""

__version__ = "0.1.0"
