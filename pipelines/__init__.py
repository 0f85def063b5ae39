"""Diffusers adapters, model-family role tables, presets, demo models and tiny test pipelines."""
