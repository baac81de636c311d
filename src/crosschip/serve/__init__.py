"""Serve: an OpenAI-compatible server with continuous batching on the inference chip."""
