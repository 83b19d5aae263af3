"""Training of the compressor (conditional LoRA) and its sequence encoding."""
