"""Model-card templates, installed as the package data ``hf_babai.model_cards`` (see README.md here)."""
