"""The model-card templates (Jinja2 over huggingface_hub.ModelCard): installed as hf_relearn.card_templates."""
