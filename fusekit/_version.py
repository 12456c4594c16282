"""The installed fusekit's version (stores record which release wrote them)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fusekit")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+local"
