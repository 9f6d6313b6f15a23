"""Research tools built on ordinary keel runs: scaling ladders (scale.py)."""
