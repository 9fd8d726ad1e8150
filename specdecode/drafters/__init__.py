"""Drafters: cheap proposers of the next k tokens, all behind the `Drafter` protocol.

To add one, write a class with `begin`, `propose` and `observe` (see base.py) in a new
file here and register it in `factory.py`.
"""

from specdecode.drafters.base import Draft, Drafter

__all__ = ["Draft", "Drafter"]
