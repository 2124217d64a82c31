"""Dataset distillation building blocks: matching losses, differentiable augmentation, trajectory unrolls."""
