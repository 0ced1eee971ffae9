"""Files: prompt readers, crash-safe result files, whole-or-nothing writes, reference image downloads."""
