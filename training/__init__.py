"""Training: SFT with checkpoint resume, data loading, the hyperparameter sweep, export (issue 5)."""
