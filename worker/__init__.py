"""The worker process, its job functions, and the generation backends."""
