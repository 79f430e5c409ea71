"""Inference: the reference ISD engine, the OpenAI-compatible server and the SGLang integration."""
