"""Root tests: the `root` marker, the fail-without-root check and the namespace fixtures all
come from tests/rootenv.py."""

from tests.rootenv import *  # noqa: F403
