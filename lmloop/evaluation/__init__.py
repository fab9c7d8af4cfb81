"""Evaluation: perplexity under a stated protocol, and the seq2seq metrics."""
