"""Episodes are data: a frozen record stored by the splits stage and produced online by the training sampler."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Episode:
    """One N-way K-shot task.

    ``class_ids`` are the domain's class ids (1..C) in episode order: in the episode's label maps, class_ids[i]
    becomes label i + 1, every other class becomes background 0, and 255 stays ignore. ``support`` / ``query``
    are image indices into the domain's prepared arrays (support: K per class, grouped by class in order).
    """

    domain: str
    class_ids: tuple[int, ...]
    support: tuple[int, ...]
    query: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"domain": self.domain, "class_ids": list(self.class_ids), "support": list(self.support),
                "query": list(self.query)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Episode:
        return cls(domain=d["domain"], class_ids=tuple(d["class_ids"]), support=tuple(d["support"]),
                   query=tuple(d["query"]))
