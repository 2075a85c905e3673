"""Frankenmerge Studio: layer-spliced LLMs from a recipe, previewed, built and exported."""
