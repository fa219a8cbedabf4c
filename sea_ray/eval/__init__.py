"""Evaluation: alignment diagnostics (nearest-word accuracy, TACS, modality gap), QA accuracy by
generation, language retention (perplexity before/after), reports (``sea-ray eval``,
``sea-ray generate``). Pure PyTorch; nothing here imports Ray."""
