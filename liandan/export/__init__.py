"""Export: GGUF (export.gguf) and Ollama Modelfiles (export.ollama); `liandan export` (export.cli)."""
