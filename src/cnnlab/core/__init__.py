"""The base: errors, files, keys, config and the shims over library internals. Imports no other wing."""
