"""The head: the store's table of contents, replaced atomically as a whole.

The head lists every visit that exists, with the objects that hold it and the
figures ``log`` shows.  A visit becomes visible only when a new head naming
it has been written; everything it names was made durable before that, so a
crash at any moment leaves either the old head or the new one, both whole.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields
from typing import Any

import xxhash

from .errors import CorruptStore, VisitNotFound
from .formats import check_document

HEAD_VERSION = 2
# A head that names no retained layers is written as version 1, so stores
# that never needed them stay readable by every version-1 reader.
RETAINED_FIELDS = ("retained_layers", "retained_bytes")
MESSAGE_PREFIX = "msg:"


@dataclass(slots=True)
class VisitRecord:
    """One visit as the head lists it."""

    visit: int
    time_ns: int
    message: str
    layer: str
    manifest: str
    contents: str
    kind: str
    tree_digest: str
    entries: int = 0
    tree_bytes: int = 0
    added: int = 0
    changed: int = 0
    deleted: int = 0
    metadata_only: int = 0
    layer_bytes: int = 0
    manifest_bytes: int = 0
    stored: dict[str, int] = field(default_factory=dict)
    manifest_reference: str = ""
    retained_layers: list[str] = field(default_factory=list)
    retained_bytes: int = 0

    @property
    def bytes_stored(self) -> int:
        return self.layer_bytes + self.manifest_bytes

    def layers(self) -> list[str]:
        """The layer of this visit and the layers it keeps for dropped visits."""
        return [self.layer, *self.retained_layers]

    def objects(self) -> list[str]:
        names = [*self.layers(), self.manifest, self.contents]
        return names + ([self.manifest_reference] if self.manifest_reference else [])


@dataclass(slots=True)
class Head:
    """The decoded head; ``generation`` grows by one with every commit."""

    generation: int = 0
    next_visit: int = 1
    visits: list[VisitRecord] = field(default_factory=list)
    garbage: list[str] = field(default_factory=list)
    garbage_times: dict[str, int] = field(default_factory=dict)

    def latest(self) -> VisitRecord | None:
        return self.visits[-1] if self.visits else None

    def stamp_garbage(self, now_ns: int) -> None:
        """Record when each retired object was first committed as garbage."""
        self.garbage_times = {
            name: self.garbage_times.get(name, now_ns) for name in self.garbage
        }

    def garbage_since(self) -> dict[str, int]:
        """Each retired object with the time it was retired (0: unknown, old)."""
        return {name: self.garbage_times.get(name, 0) for name in self.garbage}

    def drop_garbage(self, names: list[str]) -> None:
        gone = set(names)
        self.garbage = [name for name in self.garbage if name not in gone]
        self.garbage_times = {
            name: when for name, when in self.garbage_times.items() if name not in gone
        }

    def referenced_objects(self) -> set[str]:
        names: set[str] = set()
        for record in self.visits:
            names.update(record.objects())
        return names

    def find(self, visit: int, location: str) -> VisitRecord:
        for record in self.visits:
            if record.visit == visit:
                return record
        raise VisitNotFound(self._missing_message(visit, location))

    def resolve(self, spec: str | int | None, location: str) -> VisitRecord:
        """Find a visit by number, negative offset (-1 = latest) or message.

        Numbers win over messages, so a message that is itself a number is
        named with the ``msg:`` prefix (``msg:42``), which always means a
        message.
        """
        if not self.visits:
            raise VisitNotFound(f"{location}: the store has no visits yet")
        if spec is None:
            return self.visits[-1]
        if isinstance(spec, str) and spec.startswith(MESSAGE_PREFIX):
            return self._by_message(spec[len(MESSAGE_PREFIX) :], location)
        number = _as_int(spec, location)
        if number is not None and number < 0:
            if -number > len(self.visits):
                raise VisitNotFound(
                    f"{location}: visit {number} reaches before the oldest kept "
                    f"visit; kept visits: {self.kept_ranges()}"
                )
            return self.visits[number]
        if number is not None:
            return self.find(number, location)
        return self._by_message(str(spec), location)

    def kept_ranges(self) -> str:
        return format_ranges([record.visit for record in self.visits])

    def _by_message(self, message: str, location: str) -> VisitRecord:
        matches = [record for record in self.visits if record.message == message]
        if len(matches) == 1:
            return matches[0]
        if matches:
            numbers = format_ranges([record.visit for record in matches])
            raise VisitNotFound(
                f"{location}: message {message!r} names visits {numbers}; "
                "give a visit number"
            )
        raise VisitNotFound(
            f"{location}: no visit has the message {message!r}; "
            "'deltatar log' lists the visits"
        )

    def _missing_message(self, visit: int, location: str) -> str:
        kept = self.kept_ranges() or "none"
        if 1 <= visit < self.next_visit:
            return f"{location}: visit {visit} was compacted away; kept visits: {kept}"
        return f"{location}: there is no visit {visit}; kept visits: {kept}"


def format_ranges(numbers: list[int]) -> str:
    """``[1, 2, 3, 7]`` becomes ``"1-3, 7"``."""
    ranges: list[str] = []
    start = previous = None
    for number in sorted(numbers):
        if previous is not None and number == previous + 1:
            previous = number
            continue
        if start is not None:
            ranges.append(_range_text(start, previous))
        start = previous = number
    if start is not None:
        ranges.append(_range_text(start, previous))
    return ", ".join(ranges)


def _range_text(start: int, end: int | None) -> str:
    return str(start) if start == end else f"{start}-{end}"


MAX_VISIT_DIGITS = 1000


def _as_int(spec: str | int, location: str) -> int | None:
    """A visit number written as plain ASCII digits, with an optional minus."""
    if isinstance(spec, int):
        return spec
    if not re.fullmatch(r"-?[0-9]+", spec):
        return None
    if len(spec) > MAX_VISIT_DIGITS:
        # int() refuses this many digits; no visit number comes near it.
        raise VisitNotFound(
            f"{location}: there is no visit with a {len(spec)}-digit number"
        )
    return int(spec)


def encode(head: Head) -> bytes:
    retains = any(record.retained_layers for record in head.visits)
    version = HEAD_VERSION if retains else 1
    document: dict[str, Any] = {"format": "deltatar-head", "version": version}
    document.update(
        generation=head.generation,
        next_visit=head.next_visit,
        visits=[_record_document(record, retains) for record in head.visits],
        garbage=list(head.garbage),
        garbage_times=dict(head.garbage_times),
    )
    if not head.garbage_times:
        # Written only when there is garbage, so heads of format 1 readers
        # that predate the field look exactly as they always did.
        del document["garbage_times"]
    document["checksum"] = _checksum(document)
    return json.dumps(document, indent=1).encode()


def _record_document(record: VisitRecord, retains: bool) -> dict[str, Any]:
    """One record as a plain dict, in field order.

    Built by hand rather than with ``dataclasses.asdict``, whose deep copies
    made writing the head cost more than the rest of a small append.
    """
    names = _RECORD_FIELDS if retains else _RECORD_FIELDS_V1
    document = {name: getattr(record, name) for name in names}
    document["stored"] = dict(record.stored)
    if retains:
        document["retained_layers"] = list(record.retained_layers)
    return document


def _checksum(document: dict[str, Any]) -> str:
    """xxh3-128 of the head's canonical JSON without its own checksum field."""
    body = {key: value for key, value in document.items() if key != "checksum"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return xxhash.xxh3_128_hexdigest(canonical.encode())


_RECORD_FIELDS = tuple(item.name for item in fields(VisitRecord))
_RECORD_FIELDS_V1 = tuple(
    name for name in _RECORD_FIELDS if name not in RETAINED_FIELDS
)

OBJECT_NAME = re.compile(r"(layers|manifests|contents)/[A-Za-z0-9][A-Za-z0-9._-]*")


def _check_names(head: Head, location: str) -> None:
    """Refuse object names that could reach outside the store's object folders."""
    names = list(head.garbage)
    for record in head.visits:
        names += record.objects()
    for name in names:
        if not isinstance(name, str) or not OBJECT_NAME.fullmatch(name):
            raise CorruptStore(f"{location}: HEAD names an invalid object {name!r}")


def decode(data: bytes, location: str) -> Head:
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise CorruptStore(f"{location}: HEAD does not parse") from None
    check_document(document, "deltatar-head", HEAD_VERSION, f"{location}: HEAD")
    if "checksum" in document and document["checksum"] != _checksum(document):
        raise CorruptStore(
            f"{location}: HEAD is damaged (its checksum does not match); "
            "run 'deltatar verify'"
        )
    try:
        head = Head(
            generation=int(document["generation"]),
            next_visit=int(document["next_visit"]),
            visits=[VisitRecord(**item) for item in document["visits"]],
            garbage=list(document.get("garbage", [])),
            garbage_times={
                str(name): int(when)
                for name, when in dict(document.get("garbage_times", {})).items()
            },
        )
    except (KeyError, TypeError, ValueError) as error:
        raise CorruptStore(f"{location}: HEAD is malformed ({error!r})") from None
    _check_names(head, location)
    return head
