"""The small synthetic taxonomy the tiny-ensemble tests share (imported by test modules)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class C:
    wnid: str
    name: str
    broad: str
    domain: str
    wordnet_path: tuple[str, ...]


def class_like(wnid: str, broad: str, path: str) -> C:
    return C(wnid, wnid, broad, "thing", tuple(s.strip() for s in path.split(">")))


# broad/a: a > {x, y}; x > {a1, a2}; y > {a3, z}; z > {a4, a5}   (three levels below the broad)
# broad/b: b > {b1, b2}
# broad/c: c > {c1}                   (a single child: a softmax of one, its row never trains)
CLASSES = [
    class_like("a1", "a", "e > a > x > a1"),
    class_like("a2", "a", "e > a > x > a2"),
    class_like("a3", "a", "e > a > y > a3"),
    class_like("a4", "a", "e > a > y > z > a4"),
    class_like("a5", "a", "e > a > y > z > a5"),
    class_like("b1", "b", "e > b > b1"),
    class_like("b2", "b", "e > b > b2"),
    class_like("c1", "c", "e > c > c1"),
]
