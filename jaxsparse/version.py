"""The installed version of jaxsparse (``jaxsparse.__version__``).

In its own module so that code inside the package (the output marker of :mod:`jaxsparse.atomic`)
reads it without importing the front door, :mod:`jaxsparse`, which sits above everything.

Example:
    >>> isinstance(__version__, str) and len(__version__) > 0
    True
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("jaxsparse")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"
