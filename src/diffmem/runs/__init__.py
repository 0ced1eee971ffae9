"""The runs that tie methods together: generation, `reproduce` and `compare`."""
