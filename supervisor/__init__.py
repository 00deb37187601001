"""corral's supervisor: the daemon, its store, templates, SSH server and the CLI."""

__version__ = "0.1.0"
