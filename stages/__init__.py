"""The pipeline: one module per DVC stage, and what only the pipeline needs (see README, "Layout")."""
