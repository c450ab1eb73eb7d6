"""cnnlab: train, track and compare CNN architectures on MNIST-style data."""

__version__ = "0.1.0"
