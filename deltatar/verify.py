"""Check a store without changing it.

A quick check proves the structure: every manifest parses and names safe
paths, every layer's seek table is whole and every recipe range lies inside
its layer.  A full check also decompresses every frame a visit needs and
rebuilds every content, comparing it with its content id.  Each problem is
reported with the visit and, where it applies, the path it damages.
"""

from __future__ import annotations

import logging

from .content import ContentSource, layers_of
from .errors import CorruptStore, DeltatarError
from .head import VisitRecord
from .manifest import FILE

logger = logging.getLogger(__name__)


def verify_store(store, visit: int | str | None, quick: bool) -> list[str]:
    """Return one line per problem; an empty list means the store is sound."""
    # A local copy of an object proves nothing about the store: read it all.
    with store.backend.reader_guard(), store.backend.uncached():
        head = store.read_head()
        records = (
            head.visits if visit is None else [head.resolve(visit, store.location)]
        )
        source = ContentSource(store.backend)
        checked: dict[str, str | None] = {}
        problems: list[str] = []
        for record in records:
            problems += _verify_visit(store, record, source, quick, checked)
    return problems


def _verify_visit(
    store, record: VisitRecord, source: ContentSource, quick: bool, checked: dict
) -> list[str]:
    from .materialize import check_entries

    where = f"visit {record.visit}"
    try:
        manifest = store.load_manifest(record)
        check_entries(manifest.entries, record, devices=True)
        departed = store.load_departed(record)
    except (DeltatarError, ValueError) as error:
        return [f"{where}: {error}"]
    if manifest.tree_digest() != record.tree_digest:
        return [f"{where}: manifest does not match the tree digest in the head"]
    problems = []
    for layer in record.layers():
        problems += _verify_layer(source, layer, quick, checked)
    problems = [f"{where}: {problem}" for problem in problems]
    for entry in manifest.entries:
        if entry.type != FILE or entry.hardlink_of is not None:
            continue
        problem = _verify_content(
            source, entry.content_id, entry.recipe, quick, checked
        )
        if problem:
            problems.append(f"{where}: {entry.path!r}: {problem}")
    for content_id, stored in departed.items():
        problem = _verify_content(source, content_id, stored.recipe, quick, checked)
        if problem:
            problems.append(f"{where}: contents list entry {content_id}: {problem}")
    return problems


def _verify_layer(
    source: ContentSource, layer: str, quick: bool, checked: dict
) -> list[str]:
    """Check a visit's own layer whole: frames no recipe reads matter to tar users."""
    key = f"layer:{layer}"
    if key not in checked:
        try:
            reader = source.reader(layer)
            if not quick:
                reader.check_all_frames()
            checked[key] = None
        except CorruptStore as error:
            checked[key] = str(error)
    return [checked[key]] if checked[key] else []


def _verify_content(
    source: ContentSource, content_id, recipe, quick: bool, checked: dict
) -> str | None:
    key = (content_id, quick, repr(recipe))
    if key in checked:
        return checked[key]
    try:
        if quick:
            _check_ranges(source, recipe or [])
        else:
            source.read_verified(recipe or [], content_id, content_id)
        problem = None
    except CorruptStore as error:
        problem = str(error)
    checked[key] = problem
    return problem


def _check_ranges(source: ContentSource, recipe: list) -> None:
    for layer in layers_of(recipe):
        source.reader(layer)
    for piece in recipe:
        if piece[0] in ("raw", "patch"):
            reader = source.reader(piece[1])
            if piece[2] + piece[3] > reader.raw_size:
                raise CorruptStore(f"{piece[1]}: range lies outside the layer")
        if piece[0] == "patch":
            _check_ranges(source, piece[5])
