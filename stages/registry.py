"""A name -> entry mapping whose lookups fail with the list of valid names.

Sources, layouts and backbones are registries: a decorated function per kind adds an entry, and
looking up a name that is not there is a user's mistake, reported in one line.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from stages.errors import UserError

T = TypeVar("T")


class Registry(dict[str, T], Generic[T]):
    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what

    def lookup(self, name: str) -> T:
        if name not in self:
            raise UserError(f"unknown {self.what} {name!r}; valid: {', '.join(sorted(self))}")
        return self[name]
