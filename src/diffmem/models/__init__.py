"""The model layer: loading pipelines, their defaults, conditioning, parameterizations, attention hooks."""
