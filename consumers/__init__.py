"""Consumer stages: one module per stage, plus the shared runtime."""
