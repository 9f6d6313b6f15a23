"""Models: the decoder-only GPT, its Hugging Face Llama mapping, memory-saving transformations."""

from keel.models.gpt import GPT, IGNORE_INDEX, linear_cross_entropy

__all__ = ["GPT", "IGNORE_INDEX", "linear_cross_entropy"]
