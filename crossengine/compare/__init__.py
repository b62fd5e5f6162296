"""Comparing engines: per-token metrics next to the logits, alignment, RL frameworks' metrics, summaries, localisation."""
