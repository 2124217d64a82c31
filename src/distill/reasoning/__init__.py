"""Black-box and reasoning-trace distillation: verifiable tasks, a sandbox for program checks, and the data
factory that generates, verifies and filters teacher samples."""
