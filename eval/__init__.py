"""Image-quality and text-alignment metrics, prompt sets, generation cache and reports."""
