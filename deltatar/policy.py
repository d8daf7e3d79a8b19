"""The compaction policy: which visits to keep and when a chain needs work.

A store's policy lives in its config and is set with ``deltatar config``.
Retention follows restic's ``forget``: ``keep-last N`` keeps the N latest
visits, ``keep-within D`` every visit within D of the latest one, and
``keep-hourly``/``daily``/``weekly``/``monthly N`` the latest visit of each of
the last N hours (days, ISO weeks, months; in UTC) that have visits.  A visit
any rule keeps is kept; a policy without rules keeps every visit, and the
latest visit is always kept.

``max-chain N`` bounds the delta layers after the latest base (beyond it,
compaction merges the smallest run of adjacent deltas; the base is not
rewritten), and ``max-delta-percent P`` bounds the bytes of those deltas
relative to the base (beyond it, the latest visit gets a new base).

Everything here decides from the head alone, so ``compact --auto`` finds out
that nothing is due without reading a manifest or a layer.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import asdict, dataclass, fields

from .errors import UsageError
from .head import VisitRecord

DURATION = re.compile(r"([0-9]{1,9})([smhdw])")
UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
COUNT_BOUNDS = (1, 1_000_000)
PERCENT_BOUNDS = (1, 100_000)
PERIODS = ("hourly", "daily", "weekly", "monthly")


@dataclass(slots=True)
class Policy:
    """A store's compaction policy; None means the rule is not set."""

    keep_last: int | None = None
    keep_within: str | None = None
    keep_hourly: int | None = None
    keep_daily: int | None = None
    keep_weekly: int | None = None
    keep_monthly: int | None = None
    max_chain: int | None = None
    max_delta_percent: int | None = None

    def keeps_everything(self) -> bool:
        return not any(getattr(self, name) is not None for name in RETENTION_FIELDS)

    def as_document(self) -> dict[str, int | str]:
        return {key: value for key, value in asdict(self).items() if value is not None}


RETENTION_FIELDS = [f.name for f in fields(Policy) if f.name.startswith("keep_")]
POLICY_KEYS = [f.name.replace("_", "-") for f in fields(Policy)]


def parse_value(key: str, value: str) -> int | str | None:
    """Check one policy value as ``deltatar config`` receives it.

    ``none`` (or an empty string) unsets a rule.  Errors name the key and
    the value, so a typo in a cron line is found from its one-line message.
    """
    if value.strip().lower() in ("", "none"):
        return None
    if key == "keep-within":
        duration_seconds(value, key)
        return value.strip()
    low, high = PERCENT_BOUNDS if key == "max-delta-percent" else COUNT_BOUNDS
    try:
        number = int(value)
    except ValueError:
        raise UsageError(f"{key} {value}: the value must be a whole number") from None
    if not low <= number <= high:
        raise UsageError(f"{key} {value}: the value must lie in {low}..{high}")
    return number


def duration_seconds(text: str, key: str = "keep-within") -> int:
    """``12h``, ``7d``, ``2w``, ``1d12h`` as seconds; anything else is refused."""
    cleaned = text.strip().lower()
    parts = DURATION.findall(cleaned)
    if not cleaned or "".join(n + u for n, u in parts) != cleaned:
        raise UsageError(
            f"{key} {text}: not a duration; write a number and a unit "
            "(s, m, h, d, w), e.g. 12h, 7d or 2w"
        )
    return sum(int(number) * UNIT_SECONDS[unit] for number, unit in parts)


def from_document(document: object, where: str) -> Policy:
    """The policy stored in the config, each value checked again."""
    if document is None:
        return Policy()
    if not isinstance(document, dict):
        raise UsageError(f"{where}: policy is not an object; reset it with config")
    policy = Policy()
    for key, value in document.items():
        name = key.replace("-", "_")
        if name not in {f.name for f in fields(Policy)}:
            continue
        setattr(policy, name, parse_value(name.replace("_", "-"), str(value)))
    return policy


def kept_visits(visits: list[VisitRecord], policy: Policy) -> list[VisitRecord]:
    """The visits the policy keeps, oldest first; the latest is always kept."""
    if not visits or policy.keeps_everything():
        return list(visits)
    newest_first = list(reversed(visits))
    keep = {newest_first[0].visit}
    if policy.keep_last:
        keep.update(r.visit for r in newest_first[: policy.keep_last])
    if policy.keep_within:
        window_ns = duration_seconds(policy.keep_within) * 1_000_000_000
        latest = newest_first[0].time_ns
        keep.update(r.visit for r in newest_first if r.time_ns >= latest - window_ns)
    for period in PERIODS:
        count = getattr(policy, f"keep_{period}")
        if count:
            keep.update(_latest_per_period(newest_first, period, count))
    return [record for record in visits if record.visit in keep]


def _latest_per_period(
    newest_first: list[VisitRecord], period: str, count: int
) -> set[int]:
    """The latest visit of each of the last ``count`` periods that have visits."""
    kept: set[int] = set()
    last_bucket = None
    for record in newest_first:
        bucket = period_of(record.time_ns, period)
        if bucket == last_bucket:
            continue
        last_bucket = bucket
        kept.add(record.visit)
        if len(kept) == count:
            break
    return kept


def period_of(time_ns: int, period: str) -> tuple[int, ...]:
    moment = datetime.datetime.fromtimestamp(time_ns / 1e9, datetime.UTC)
    if period == "hourly":
        return (moment.year, moment.month, moment.day, moment.hour)
    if period == "daily":
        return (moment.year, moment.month, moment.day)
    if period == "weekly":
        year, week, _ = moment.isocalendar()
        return (year, week)
    return (moment.year, moment.month)


# -- chain shape -------------------------------------------------------------


def latest_chain(visits: list[VisitRecord]) -> tuple[VisitRecord | None, list[str]]:
    """The latest base visit and the distinct delta layers after it, in order.

    After retention the oldest kept visit may be a delta that retains the
    layers of dropped visits; it then stands for the base.
    """
    base = visits[0] if visits else None
    layers: list[str] = []
    for record in visits[1:]:
        if record.kind == "base":
            base, layers = record, []
        elif record.layer not in layers and record.layer != base.layer:
            layers.append(record.layer)
    return base, layers


def layer_sizes(visits: list[VisitRecord]) -> dict[str, int]:
    """Each layer's bytes; visits sharing a merged layer list it once."""
    sizes: dict[str, int] = {}
    for record in visits:
        sizes[record.layer] = max(sizes.get(record.layer, 0), record.layer_bytes)
    return sizes


# TODO: only visits' own layers are merged; small retained layers that carried
# bytes pile up beside their vessel until it is dropped.
def merge_window(visits: list[VisitRecord], max_chain: int) -> list[str]:
    """Adjacent delta layers to merge so the chain drops to half of ``max_chain``.

    The window with the fewest bytes is chosen: merging costs what it reads
    and writes, and small deltas are the ones worth folding together.
    Halving rather than trimming to the bound leaves room, so a store that
    gains one visit at a time is not merged after every append.
    """
    _, layers = latest_chain(visits)
    if len(layers) <= max_chain:
        return []
    target = max(1, max_chain // 2)
    width = len(layers) - target + 1
    sizes = layer_sizes(visits)
    starts = range(len(layers) - width + 1)
    best = min(starts, key=lambda s: sum(sizes[n] for n in layers[s : s + width]))
    return layers[best : best + width]


def delta_share_percent(visits: list[VisitRecord]) -> float:
    """Bytes of the deltas after the latest base, as a percentage of the base."""
    base, layers = latest_chain(visits)
    base_bytes = base.layer_bytes + base.retained_bytes if base else 0
    if not base_bytes:
        return 0.0
    sizes = layer_sizes(visits)
    return 100.0 * sum(sizes[name] for name in layers) / base_bytes
