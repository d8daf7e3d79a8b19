"""Damage a store's files on purpose and check that nobody is fooled.

Every case works on a fresh copy of one pristine store of three visits
(three 1 MiB files; visit 2 rewrites one, visit 3 adds a small one)
and damages one file: a flipped byte at some offset, or a truncation.  Then:

* ``verify`` exits non-zero and names a visit that depends on the damage, and
  it never changes a byte of the store;
* ``materialize`` never prints a traceback and never exits 0 with a tree that
  differs from the one appended;
* visits that do not use the damaged file still materialize exactly.

A flip that changes nothing anybody reads (a timestamp in the head, a
store id) may go unnoticed; that is accepted only when every visit then
still verifies and materializes exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import pyzstd
from conftest import (
    Visits,
    assert_same_tree,
    cli_command,
    cli_env,
    describe_run,
    run_cli,
    tree_state,
)

from deltatar import Store
from deltatar.head import VisitRecord

MIB = 1024 * 1024
STORE_LEVEL = ("HEAD", "deltatar-store.json")


# ------------------------------------------------------------ the pristine store


@dataclass
class Pristine:
    store: Path
    references: dict[int, dict]
    objects: dict[str, tuple[str, int]]  # file -> (kind, visit it belongs to)
    users: dict[str, set[int]]  # file -> visits that read it


def layers_in(recipe: list) -> set[str]:
    names = set()
    for piece in recipe or []:
        if piece[0] in ("raw", "patch"):
            names.add(piece[1])
        if piece[0] == "patch":
            names |= layers_in(piece[5])
    return names


def describe_store(store: Path) -> tuple[dict, dict]:
    head = json.loads((store / "HEAD").read_bytes())
    objects, users = {}, {}
    for record in head["visits"]:
        visit = record["visit"]
        for kind in ("layer", "manifest", "contents"):
            objects[record[kind]] = (kind, visit)
            users.setdefault(record[kind], set()).add(visit)
        if record.get("manifest_reference"):
            users.setdefault(record["manifest_reference"], set()).add(visit)
        manifest = Store.open(store).load_manifest(VisitRecord(**record))
        for entry in manifest.entries:
            for layer in layers_in(entry.recipe):
                users.setdefault(layer, set()).add(visit)
    for name in STORE_LEVEL:
        objects[name] = (name, 0)
        users[name] = {record["visit"] for record in head["visits"]}
    return objects, users


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Pristine:
    base = tmp_path_factory.mktemp("pristine")
    visits = Visits(base)
    for name in ("f1", "f2", "f3"):
        (visits.src / name).write_bytes(os.urandom(MIB))
    visits.append()
    (visits.src / "f2").write_bytes(os.urandom(MIB))
    visits.append()
    (visits.src / "f4").write_bytes(b"small\n")
    visits.append()
    references = {n: tree_state(ref) for n, ref in enumerate(visits.references, 1)}
    # One reader creates readers.lock, which every later reader then only opens.
    run_cli("verify", "--store", visits.store)
    objects, users = describe_store(visits.store)
    return Pristine(visits.store, references, objects, users)


def store_hashes(store: Path) -> dict[str, str]:
    hashes = {}
    for directory, _, names in os.walk(store):
        for name in names:
            path = os.path.join(directory, name)
            hashes[os.path.relpath(path, store)] = hashlib.sha256(
                Path(path).read_bytes()
            ).hexdigest()
    return hashes


# ------------------------------------------------------------------ damage


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path, length: int) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(length)


def flip_offsets(size: int, count: int) -> list[int]:
    """Offsets spread over the file, plus its first and last bytes."""
    spread = {size * i // (count + 1) for i in range(1, count + 1)}
    ends = {0, 4, size - 1, size - 5, size - 9, size - 13}
    return sorted(o for o in spread | ends if 0 <= o < size)


def cases_for(pristine: Pristine, name: str, flips: int) -> list[tuple[str, str, int]]:
    size = (pristine.store / name).stat().st_size
    cases = [(name, "flip", offset) for offset in flip_offsets(size, flips)]
    cases += [(name, "truncate", length) for length in sorted({0, size // 2, size - 1})]
    return cases


# ------------------------------------------------------------------ checks


def start(*args) -> subprocess.Popen:
    return subprocess.Popen(
        cli_command(*args),
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        encoding="utf-8",
        errors="surrogateescape",
    )


def finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def assert_clean_failure(result: subprocess.CompletedProcess, why: str) -> None:
    """Exit 1 with a single ``deltatar: error:`` line and no traceback."""
    assert "Traceback" not in result.stderr, describe_run(result, f"{why}: traceback")
    assert result.returncode == 1, describe_run(result, f"{why}: expected exit 1")
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deltatar: error:"), describe_run(
        result, f"{why}: expected one error line"
    )


def named_visits(text: str) -> set[int]:
    return {int(n) for n in re.findall(r"visit (\d+)", text)}


def check_damage(
    pristine: Pristine, work: Path, name: str, how: str, where: int
) -> str:
    """Damage a copy, run verify and materialize every visit; return the outcome."""
    store = work / "store"
    shutil.copytree(pristine.store, store)
    damage = flip if how == "flip" else truncate
    damage(store / name, where)
    label = f"{name} {how} at {where}"
    before = store_hashes(store)

    verify = start("verify", "--store", store)
    dests = {visit: work / f"m{visit}" for visit in pristine.references}
    runs = {
        visit: start("materialize", "--store", store, "--visit", str(visit), dest)
        for visit, dest in dests.items()
    }
    verified = finish(verify)
    restored = {visit: finish(process) for visit, process in runs.items()}
    assert store_hashes(store) == before, (
        f"{label}: verify or materialize changed the store"
    )

    affected = pristine.users[name]
    for visit, result in restored.items():
        if result.returncode == 0:
            assert_same_tree(pristine.references[visit], dests[visit])
        else:
            assert visit in affected, describe_run(
                result, f"{label}: visit {visit} does not use it"
            )
            assert_clean_failure(result, f"{label}: materialize visit {visit}")

    assert "Traceback" not in verified.stderr, describe_run(
        verified, f"{label}: verify"
    )
    if verified.returncode == 0:
        # Only a flip nobody reads may pass unnoticed.
        assert how == "flip", describe_run(verified, f"{label}: truncation not found")
        assert all(r.returncode == 0 for r in restored.values()), describe_run(
            verified, f"{label}: verify passed but a visit does not restore"
        )
        shutil.rmtree(work)
        return "harmless"
    assert verified.returncode == 1, describe_run(verified, f"{label}: verify")
    if name not in STORE_LEVEL:
        found = named_visits(verified.stderr + verified.stdout)
        assert found & affected, describe_run(
            verified, f"{label}: verify should name one of visits {sorted(affected)}"
        )
    shutil.rmtree(work)
    return "detected"


def run_cases(pristine: Pristine, tmp_path: Path, cases) -> dict[str, int]:
    outcomes = {"detected": 0, "harmless": 0}
    for number, (name, how, where) in enumerate(cases):
        outcome = check_damage(pristine, tmp_path / f"case{number}", name, how, where)
        outcomes[outcome] += 1
    return outcomes


def objects_of_visit(pristine: Pristine, visit: int) -> list[str]:
    return sorted(n for n, (_, v) in pristine.objects.items() if v == visit)


# ------------------------------------------------------------------- tests


@pytest.mark.parametrize("kind", ["layer", "manifest", "contents"])
def test_damaged_object_of_middle_visit_is_reported(pristine, tmp_path, kind) -> None:
    (name,) = [n for n, (k, v) in pristine.objects.items() if k == kind and v == 2]
    outcomes = run_cases(pristine, tmp_path, cases_for(pristine, name, flips=6))
    assert outcomes["detected"] >= 3  # at least every truncation


@pytest.mark.parametrize("name", STORE_LEVEL)
def test_damaged_head_or_store_header_is_reported(pristine, tmp_path, name) -> None:
    outcomes = run_cases(pristine, tmp_path, cases_for(pristine, name, flips=4))
    assert outcomes["detected"] >= 3


@pytest.mark.slow
def test_every_object_damaged_many_ways(pristine, tmp_path, capsys) -> None:
    cases = []
    for name in sorted(pristine.objects):
        cases += cases_for(pristine, name, flips=8)
    outcomes = run_cases(pristine, tmp_path, cases)
    with capsys.disabled():
        print(f"\n[corruption] {len(cases)} damaged copies: {outcomes}")
    assert sum(outcomes.values()) == len(cases)


def test_missing_middle_layer_names_visit_2(pristine, tmp_path) -> None:
    # The layer visit 2 wrote is deleted outright.
    store = tmp_path / "store"
    shutil.copytree(pristine.store, store)
    (layer,) = [n for n, (k, v) in pristine.objects.items() if k == "layer" and v == 2]
    (store / layer).unlink()
    before = store_hashes(store)

    verified = run_cli("verify", "--store", store, check=False)
    assert verified.returncode == 1, describe_run(verified, "missing layer")
    assert 2 in named_visits(verified.stderr), verified.stderr
    assert "damaged:" in verified.stderr

    result = run_cli(
        "materialize", "--store", store, "--visit", "3", tmp_path / "m3", check=False
    )
    assert_clean_failure(result, "visit 3 reads the missing layer")
    run_cli("materialize", "--store", store, "--visit", "1", tmp_path / "m1")
    assert_same_tree(pristine.references[1], tmp_path / "m1")
    assert store_hashes(store) == before


def test_verify_reads_every_frame_of_a_layer(pristine, tmp_path) -> None:
    # The first frame of a delta layer may hold only tar headers that no
    # recipe reads; damage there still breaks `zstd -dc LAYER | tar -x`.
    store = tmp_path / "store"
    shutil.copytree(pristine.store, store)
    (layer,) = [n for n, (k, v) in pristine.objects.items() if k == "layer" and v == 2]
    flip(store / layer, 0)

    verified = run_cli("verify", "--store", store, check=False)
    assert verified.returncode == 1, describe_run(
        verified, "zstd magic of frame 0 flipped"
    )
    assert 2 in named_visits(verified.stderr), verified.stderr


def rewrite_contents(path: Path, change) -> None:
    document = json.loads(pyzstd.decompress(path.read_bytes()))
    change(document)
    path.write_bytes(pyzstd.compress(json.dumps(document).encode()))


def test_verify_reports_a_wrong_recipe_in_a_contents_list(pristine, tmp_path) -> None:
    # A contents list keeps the recipes of contents that left the tree at its
    # visit (visit 2 replaced f2); the next append trusts them for dedup, so
    # a recipe there that does not rebuild its content would poison later visits.
    store = tmp_path / "store"
    shutil.copytree(pristine.store, store)
    (name,) = [
        n for n, (k, v) in pristine.objects.items() if k == "contents" and v == 2
    ]

    def shift_first_recipe(document: dict) -> None:
        content_id = sorted(document)[0]
        size, recipe, blocks = document[content_id]
        recipe[0][2] += 1
        document[content_id] = [size, recipe, blocks]

    rewrite_contents(store / name, shift_first_recipe)
    verified = run_cli("verify", "--store", store, check=False)
    assert verified.returncode == 1, describe_run(verified, "poisoned contents list")
    assert 2 in named_visits(verified.stderr)
