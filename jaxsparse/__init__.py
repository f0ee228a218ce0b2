"""jaxsparse: sparse parameter-efficient fine-tuning for JAX/Flax."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("jaxsparse")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"
