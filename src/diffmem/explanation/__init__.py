"""Which words of a prompt drive memorization: attributions (tensors) and their rendering."""
