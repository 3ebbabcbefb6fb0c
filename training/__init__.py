"""Training: dataset import, captioning, curation, LoRA training, comparison and publishing."""
