"""Training-time mitigation: the training loop with the magnitude filter, and fine-tuning on a folder."""
