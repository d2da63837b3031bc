"""The base model: where it comes from, GGUF conversion, quantized loading."""
