"""Tests for dataset distillation (distill.condense)."""
