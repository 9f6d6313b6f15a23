"""Models: the decoder-only GPT, its Hugging Face Llama mapping, memory-saving transformations."""

from keel.models.gpt import GPT

__all__ = ["GPT"]
