"""keel: train transformers end to end, supervised."""
