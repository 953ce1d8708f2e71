"""`Record`: `typing.NamedTuple` to mypy, a `collections.namedtuple` at run time.

The run stage's state and identity are NamedTuples, and importing `typing` for them cost every
run call 4 ms (measured, docs/performance.md); collections is loaded anyway (re needs it). A
class body works as with NamedTuple: annotated fields (defaults last), methods, properties and
a docstring. Nothing else of typing's NamedTuple (generics, `__orig_bases__`) is supported."""

from __future__ import annotations

import collections

# Not typing.TYPE_CHECKING: importing typing is what this module avoids. mypy treats any
# name TYPE_CHECKING as true.
TYPE_CHECKING = False
__all__ = ["TYPE_CHECKING", "Record"]

if TYPE_CHECKING:
    from typing import NamedTuple as Record
else:
    _OWN = frozenset({"__annotations__", "__module__", "__qualname__", "__dict__",
                      "__weakref__", "__doc__", "_root"})

    class _RecordMeta(type):
        def __new__(mcls, name, bases, namespace):
            if namespace.get("_root"):
                return super().__new__(mcls, name, bases, namespace)
            fields = tuple(namespace.get("__annotations__", {}))
            defaults = [namespace[f] for f in fields if f in namespace]
            cls = collections.namedtuple(name, fields, defaults=defaults,
                                         module=namespace.get("__module__"))
            cls.__qualname__ = namespace.get("__qualname__", name)
            if namespace.get("__doc__"):
                cls.__doc__ = namespace["__doc__"]
            for key, value in namespace.items():
                if key not in _OWN and key not in fields:
                    setattr(cls, key, value)
            return cls

    class Record(metaclass=_RecordMeta):
        _root = True
