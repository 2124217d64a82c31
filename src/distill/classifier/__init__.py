"""The classifier family's building blocks: a small model zoo, datasets and batch augmentations."""
