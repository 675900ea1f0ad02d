"""fmnist-dist: the PyTorch FashionMNIST quickstart as distributed training with Hugging Face Accelerate."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fmnist-dist")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"
