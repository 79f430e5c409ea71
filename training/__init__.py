"""Training: LlamaFactory extension, stride curriculum, gated-LoRA training (see README)."""
