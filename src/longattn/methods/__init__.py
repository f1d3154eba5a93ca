"""Built-in methods; importing this package registers them (done lazily by the registry)."""

from . import full, window, sink, bigbird, topk, moba, nsa  # noqa: F401
