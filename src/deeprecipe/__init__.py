"""deeprecipe: train, check, evaluate, export and serve the classic deep-learning systems."""
