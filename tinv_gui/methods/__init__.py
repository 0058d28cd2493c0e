"""Training methods: plain functions of (models, data, settings, reporter)."""
