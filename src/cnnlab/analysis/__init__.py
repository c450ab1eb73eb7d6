"""The analysis wing: evaluate, compare, stats, predict and register. Imports core, tracking and training."""
