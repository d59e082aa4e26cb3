"""Taxonomy: building the tree from WordNet chains, queries, persistence and versioning."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from fieldlens.common.taxonomy import ROOT, Taxon, Taxonomy


@dataclass(frozen=True)
class C:
    wnid: str
    name: str
    broad: str
    domain: str
    wordnet_path: tuple[str, ...]


def _p(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(">"))


# Hand-built classes. Expected tree (derived by hand from the collapsing rule):
#   root
#   +- domain/animal
#   |  +- broad/bird
#   |  |  +- node/bird/bird_of_prey        (children: eagle node, black kite; "kite" collapsed)
#   |  |  |  +- node/bird/eagle            (bald eagle, golden eagle)
#   |  |  |  |  +- n001, n002
#   |  |  |  +- n003
#   |  |  +- n004                          ("wader" > "heron" chain collapsed entirely)
#   |  +- broad/bony_fish
#   |     +- n005                          (broad kept with one child)
#   +- domain/artifact                     (domain kept with one child)
#      +- broad/tool
#         +- n006
CLASSES = [
    C(
        "n001",
        "bald eagle",
        "bird",
        "animal",
        _p("entity > animal > bird > bird of prey > eagle > bald eagle"),
    ),
    C(
        "n002",
        "golden eagle",
        "bird",
        "animal",
        _p("entity > animal > bird > bird of prey > eagle > golden eagle"),
    ),
    C(
        "n003",
        "black kite",
        "bird",
        "animal",
        _p("entity > animal > bird > bird of prey > kite > black kite"),
    ),
    C(
        "n004",
        "grey heron",
        "bird",
        "animal",
        _p("entity > animal > bird > wader > heron > grey heron"),
    ),
    C("n005", "goldfish", "bony_fish", "animal", _p("entity > animal > fish > goldfish")),
    C("n006", "hammer", "tool", "artifact", _p("entity > artifact > tool > hammer")),
]

EXPECTED_PARENT = {
    ROOT: None,
    "domain/animal": ROOT,
    "domain/artifact": ROOT,
    "broad/bird": "domain/animal",
    "broad/bony_fish": "domain/animal",
    "broad/tool": "domain/artifact",
    "node/bird/bird_of_prey": "broad/bird",
    "node/bird/eagle": "node/bird/bird_of_prey",
    "n001": "node/bird/eagle",
    "n002": "node/bird/eagle",
    "n003": "node/bird/bird_of_prey",
    "n004": "broad/bird",
    "n005": "broad/bony_fish",
    "n006": "broad/tool",
}


@pytest.fixture()
def tax() -> Taxonomy:
    return Taxonomy.from_classes(CLASSES)


def _ancestors_by_parent_walk(tax: Taxonomy, t: str) -> set[str]:
    out = {t}
    p = tax.get(t).parent
    while p is not None:
        out.add(p)
        p = tax.get(p).parent
    return out


def test_tree_matches_hand_derived_shape(tax: Taxonomy) -> None:
    assert {t.id for t in tax} == set(EXPECTED_PARENT)
    assert len(tax) == len(EXPECTED_PARENT)
    for tid, parent in EXPECTED_PARENT.items():
        assert tax.get(tid).parent == parent, tid
    for tid in EXPECTED_PARENT:
        expected_kids = {c for c, p in EXPECTED_PARENT.items() if p == tid}
        assert set(tax.children(tid)) == expected_kids, tid


def test_single_child_wordnet_chains_are_collapsed(tax: Taxonomy) -> None:
    ids = {t.id for t in tax}
    # "kite" had only "black kite"; "wader" > "heron" was a chain to "grey heron".
    assert not any(i.endswith(("/kite", "/wader", "/heron")) for i in ids)
    assert tax.get("n003").parent == "node/bird/bird_of_prey"
    assert tax.get("n004").parent == "broad/bird"
    for t in tax:
        if t.rank == "node":
            assert len(tax.children(t.id)) >= 2, t.id


def test_root_domain_and_broad_levels_are_kept_with_one_child(tax: Taxonomy) -> None:
    assert tax.children("domain/artifact") == ["broad/tool"]
    assert tax.children("broad/tool") == ["n006"]
    assert tax.children("broad/bony_fish") == ["n005"]
    assert tax.path("n006") == [ROOT, "domain/artifact", "broad/tool", "n006"]
    # Even a one-class, one-domain world keeps all three levels.
    solo = Taxonomy.from_classes([CLASSES[5]])
    assert solo.path("n006") == [ROOT, "domain/artifact", "broad/tool", "n006"]
    assert solo.children(ROOT) == ["domain/artifact"]


def test_ranks_depths_and_names(tax: Taxonomy) -> None:
    ranks = {
        ROOT: "root",
        "domain/animal": "domain",
        "broad/bony_fish": "broad",
        "node/bird/eagle": "node",
        "n002": "class",
    }
    for tid, rank in ranks.items():
        assert tax.get(tid).rank == rank
    for t in tax:
        assert t.depth == len(tax.path(t.id)) - 1
    assert tax.get("n001").depth == 5
    assert tax.get("broad/bony_fish").name == "bony fish"
    assert tax.get("node/bird/bird_of_prey").name == "bird of prey"
    assert tax.get("n004").name == "grey heron"
    assert tax.broad_ids == ("broad/bird", "broad/bony_fish", "broad/tool")
    assert tax.class_ids == tuple(c.wnid for c in CLASSES)


def test_diverging_chains_share_the_divergence_node(tax: Taxonomy) -> None:
    # bald and golden eagle diverge below "eagle": both hang from the same node.
    assert tax.get("n001").parent == tax.get("n002").parent == "node/bird/eagle"
    # eagles and the kite diverge below "bird of prey": they share that node.
    shared = set(tax.path("n001")) & set(tax.path("n003"))
    deepest_shared = max(shared, key=lambda t: tax.get(t).depth)
    assert deepest_shared == "node/bird/bird_of_prey"


def test_intermediate_node_ids_are_node_group_slug(tax: Taxonomy) -> None:
    nodes = [t.id for t in tax if t.rank == "node"]
    assert sorted(nodes) == ["node/bird/bird_of_prey", "node/bird/eagle"]
    for n in nodes:
        assert re.fullmatch(r"node/bird/[a-z0-9_]+", n)


def test_equal_node_names_on_different_branches_stay_distinct() -> None:
    classes = [
        C("p1", "a", "plant", "plant", _p("e > plant > herb > leaf > a")),
        C("p2", "b", "plant", "plant", _p("e > plant > herb > leaf > b")),
        C("p3", "c", "plant", "plant", _p("e > plant > tree > leaf > c")),
        C("p4", "d", "plant", "plant", _p("e > plant > tree > leaf > d")),
    ]
    tax = Taxonomy.from_classes(classes)
    # herb and tree each have a single child ("leaf") and are collapsed; the two "leaf" nodes
    # are different taxa, each with its own two classes.
    leaf_nodes = tax.children("broad/plant")
    assert len(leaf_nodes) == 2
    assert len(set(leaf_nodes)) == 2
    assert all(re.fullmatch(r"node/plant/leaf(_\d+)?", n) for n in leaf_nodes)
    assert {frozenset(tax.children(n)) for n in leaf_nodes} == {
        frozenset({"p1", "p2"}),
        frozenset({"p3", "p4"}),
    }


def test_path(tax: Taxonomy) -> None:
    assert tax.path(ROOT) == [ROOT]
    assert tax.path("n002") == [
        ROOT,
        "domain/animal",
        "broad/bird",
        "node/bird/bird_of_prey",
        "node/bird/eagle",
        "n002",
    ]
    assert tax.path("n004") == [ROOT, "domain/animal", "broad/bird", "n004"]


def test_broad_of(tax: Taxonomy) -> None:
    expected = {
        "n001": "broad/bird",
        "n003": "broad/bird",
        "node/bird/eagle": "broad/bird",
        "broad/bird": "broad/bird",
        "n005": "broad/bony_fish",
        "n006": "broad/tool",
        ROOT: None,
        "domain/animal": None,
        "domain/artifact": None,
    }
    for tid, broad in expected.items():
        assert tax.broad_of(tid) == broad, tid


def test_leaves_under(tax: Taxonomy) -> None:
    assert sorted(tax.leaves_under("broad/bird")) == ["n001", "n002", "n003", "n004"]
    assert sorted(tax.leaves_under("node/bird/bird_of_prey")) == ["n001", "n002", "n003"]
    assert sorted(tax.leaves_under("domain/artifact")) == ["n006"]
    assert tax.leaves_under("n003") == ["n003"]
    assert sorted(tax.leaves_under(ROOT)) == sorted(c.wnid for c in CLASSES)


def test_under_matches_brute_force_and_orders_parents_first(tax: Taxonomy) -> None:
    all_ids = [t.id for t in tax]
    for x in all_ids:
        got = tax.under(x)
        expected = {t for t in all_ids if t != x and x in _ancestors_by_parent_walk(tax, t)}
        assert len(got) == len(set(got))
        assert set(got) == expected, x
        pos = {t: i for i, t in enumerate(got)}
        for t in got:
            p = tax.get(t).parent
            if p != x:
                assert pos[p] < pos[t]
    assert tax.under("n001") == []


def test_is_ancestor_or_self_matches_parent_walk(tax: Taxonomy) -> None:
    all_ids = [t.id for t in tax]
    for a in all_ids:
        for t in all_ids:
            assert tax.is_ancestor_or_self(a, t) == (a in _ancestors_by_parent_walk(tax, t))
    assert tax.is_ancestor_or_self("n001", "n001")
    assert not tax.is_ancestor_or_self("n001", "node/bird/eagle")
    assert not tax.is_ancestor_or_self("broad/bird", "n005")


def test_save_load_roundtrip(tax: Taxonomy, tmp_path: Path) -> None:
    f = tmp_path / "taxonomy.json"
    tax.save(f)
    back = Taxonomy.load(f)
    assert back.version == tax.version
    assert back.broad_ids == tax.broad_ids
    assert back.class_ids == tax.class_ids
    assert list(back) == list(tax)
    for t in tax:
        assert back.children(t.id) == tax.children(t.id)
        assert back.broad_of(t.id) == tax.broad_of(t.id)


def test_version_is_stable_and_changes_with_the_tree(tax: Taxonomy) -> None:
    assert Taxonomy.from_classes(CLASSES).version == tax.version
    added = CLASSES + [C("n007", "saw", "tool", "artifact", _p("entity > artifact > tool > saw"))]
    assert Taxonomy.from_classes(added).version != tax.version
    moved = (
        CLASSES[:3]
        + [C("n004", "grey heron", "bony_fish", "animal", CLASSES[3].wordnet_path)]
        + CLASSES[4:]
    )
    assert Taxonomy.from_classes(moved).version != tax.version
    renamed = CLASSES[:5] + [C("n006", "mallet", "tool", "artifact", CLASSES[5].wordnet_path)]
    assert Taxonomy.from_classes(renamed).version != tax.version
    reshaped = [
        C(
            "n001",
            "bald eagle",
            "bird",
            "animal",
            _p("entity > animal > bird > bird of prey > hawk > bald eagle"),
        ),
        *CLASSES[1:],
    ]
    assert Taxonomy.from_classes(reshaped).version != tax.version


def test_constructor_validation(tax: Taxonomy) -> None:
    with pytest.raises(ValueError, match="unknown parent"):
        Taxonomy([Taxon("a", "a", "class", "missing", 1)], [], ["a"])
    with pytest.raises(ValueError, match="not a broad group"):
        Taxonomy(list(tax), ["domain/animal"], tax.class_ids)
    with pytest.raises(KeyError, match="unknown taxon 'n999'"):
        tax.get("n999")
    assert "n001" in tax and "n999" not in tax


def test_real_tiny_imagenet_classes(data_dir: Path) -> None:
    from fieldlens.trainer.data import read_classes

    classes = read_classes(data_dir)
    tax = Taxonomy.from_classes(classes)
    assert len(classes) == 200
    assert len(tax.class_ids) == 200
    assert len({c.broad for c in classes}) == 20
    assert len(tax.broad_ids) == 20
    for c in classes:
        path = tax.path(c.wnid)
        assert path[0] == ROOT
        assert path[1] == f"domain/{c.domain}"
        assert path[2] == f"broad/{c.broad}"
        assert path[-1] == c.wnid
        assert tax.get(c.wnid).rank == "class"
    for t in tax:
        if t.rank == "node":
            assert len(tax.children(t.id)) != 1, t.id
            assert len(tax.children(t.id)) >= 2, t.id
    assert sorted(tax.leaves_under(ROOT)) == sorted(c.wnid for c in classes)
