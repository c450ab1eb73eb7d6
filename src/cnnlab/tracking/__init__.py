"""The tracking wing: the MLflow store (store), the training's logger (logger), backlogs (sync),
configurations (repeats) and tasks. Imports only core."""
