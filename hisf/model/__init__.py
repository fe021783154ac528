"""The model: a frozen open_clip backbone, layer-wise prompt injection, and the prompt methods."""
