"""Graph data and plain-torch GNN teachers for GNN-to-MLP distillation (GLNN, VQGraph)."""
