"""Jinja templates for hf-sdft model cards (installed as hf_sdft.model_cards)."""
