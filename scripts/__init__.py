"""Training of the demo models and the notebook builder; run as ``python -m scripts.<name>`` from the repository root."""
