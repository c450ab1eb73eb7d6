"""The training wing: data, network, heads, the Lightning module, callbacks, checkpoints, resume,
runtime and the train and fetch jobs. Imports core and tracking."""
