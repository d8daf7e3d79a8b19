"""The command line end to end: every command run as a user runs it.

Each test drives ``python -m deltatar`` in a child process whose output is a
pipe, not a terminal, so what it checks is what a script sees: plain text,
no progress bars, and with ``--json`` one document that parses.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import (
    REPO_ROOT,
    assert_same_tree,
    cli_command,
    cli_env,
    run_cli,
    run_json,
    tree_state,
)
from conftest import write as write_file

JSON_DOC = REPO_ROOT / "docs" / "json.md"
COMMANDS = (
    "append",
    "materialize",
    "log",
    "show",
    "ls",
    "cat",
    "diff",
    "stats",
    "verify",
    "compact",
    "config",
    "completion",
)


class History:
    """A source tree and its store, with one saved copy of the tree per visit."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.src = root / "src"
        self.store = root / "store"
        self.copies: dict[int, Path] = {}
        self.src.mkdir()

    def append(self, message: str, *options: str) -> dict:
        document = run_json(
            "append", self.src, "--store", self.store, "-m", message, "--json", *options
        )
        copy = self.root / f"copy{document['visit']}"
        shutil.copytree(self.src, copy, symlinks=True)
        self.copies[document["visit"]] = copy
        return document

    def run(self, *args, **kwargs) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, "--store", self.store, **kwargs)

    def json(self, *args) -> dict:
        return run_json(*args, "--store", self.store, "--json")


@pytest.fixture
def history(tmp_path: Path) -> History:
    """Four visits: a base, a growth, an edit with a chmod, a deletion.

    Visit 2's message is "42", a message that reads as a visit number.
    """
    made = History(tmp_path)
    src = made.src
    write(src / "README.md", b"# project\n")
    write(src / "src" / "main.py", b"print('hello')\n")
    write(src / "data" / "blob.bin", bytes(range(256)) * 64)
    made.append("first")
    write(src / "src" / "util.py", b"def util():\n    return 1\n")
    with open(src / "README.md", "ab") as handle:
        handle.write(b"more words\n")
    made.append("42")
    write(src / "src" / "main.py", b"print('hello, world')\n")
    os.chmod(src / "data" / "blob.bin", 0o600)
    made.append("after verify")
    (src / "src" / "util.py").unlink()
    made.append("cleanup")
    return made


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(path, data)


def store_files(store: Path) -> dict[str, bytes]:
    """Every file of a store with its bytes: equal maps mean an untouched store.

    The empty file readers hold a shared lock on is left out: every reader,
    ``log`` included, creates it once.
    """
    files = {}
    for path in sorted(store.rglob("*")):
        if path.is_file() and path.name != "readers.lock":
            files[str(path.relative_to(store))] = path.read_bytes()
    return files


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


# -- log -------------------------------------------------------------------------


def test_log_lists_every_visit_with_its_cost_and_growth(history: History) -> None:
    out = history.run("log").stdout
    rows = [
        line
        for line in out.splitlines()
        if re.match(r"\s*\d+ (\d{4}-)?\d\d-\d\d ", line)
    ]

    assert [int(row.split()[0]) for row in rows] == [1, 2, 3, 4]
    assert "after verify" in rows[2] and "cleanup" in rows[3]
    assert "█" in rows[-1]
    assert "4 visits, store" in out
    assert all(len(line) <= 80 for line in out.splitlines()), out


def test_log_json_counts_match_the_appends(history: History) -> None:
    document = history.json("log")
    visits = document["visits"]

    assert document["schema_version"] == 1
    assert [v["message"] for v in visits] == ["first", "42", "after verify", "cleanup"]
    assert [(v["added"], v["changed"], v["deleted"]) for v in visits[1:]] == [
        (1, 2, 0),
        (0, 2, 0),
        (0, 1, 1),
    ]
    running = 0
    for visit in visits:
        running += visit["bytes_stored"]
        assert visit["cumulative_bytes"] == running
    assert document["store_bytes"] >= running


# -- looking into one visit ------------------------------------------------------


def test_ls_lists_a_visit_below_a_path(history: History) -> None:
    listed = history.run("ls", "--visit", "2", "src").stdout.splitlines()

    assert [line.split()[-1] for line in listed] == [
        "src/",
        "src/main.py",
        "src/util.py",
    ]
    document = history.json("ls", "--visit", "-1", "src")
    assert [e["path"] for e in document["entries"]] == ["src", "src/main.py"]
    assert document["visit"] == 4


def test_cat_writes_one_file_of_an_old_visit(history: History) -> None:
    argv = cli_command("cat", "--store", history.store, "--visit", "1", "data/blob.bin")
    done = subprocess.run(argv, env=cli_env(), capture_output=True, check=True)

    assert done.stdout == (history.copies[1] / "data" / "blob.bin").read_bytes()
    document = history.json("cat", "--visit", "3", "src/main.py")
    assert base64.b64decode(document["data"]) == b"print('hello, world')\n"
    assert (document["visit"], document["size"]) == (3, 22)


def test_cat_of_a_missing_path_names_it_and_the_visit(history: History) -> None:
    result = history.run("cat", "--visit", "4", "src/util.py", check=False)

    assert result.returncode == 1
    assert "src/util.py" in one_error_line(result) and "visit 4" in result.stderr


def test_show_describes_a_visit_and_its_changes(history: History) -> None:
    out = history.run("show", "3").stdout

    assert "after verify" in out and "base visit 1, previous visit 2" in out
    assert "M src/main.py" in out and "m data/blob.bin (644 -> 600)" in out
    document = history.json("show", "3")
    assert (document["visit"], document["base"], document["previous"]) == (3, 1, 2)
    assert document["changes"]["mode"] == 1 and document["changes"]["changed"] == 1


def test_show_names_the_oldest_kept_visit_as_base_after_the_base_is_dropped(
    history: History,
) -> None:
    # Dropping visits 1 and 2 leaves visit 3, a delta, at the start of the chain.
    history.run("compact", "--keep-last", "2")

    assert history.json("show", "3")["base"] == 3
    assert history.json("show", "4")["base"] == 3


# -- diff ------------------------------------------------------------------------


def test_diff_names_added_changed_deleted_and_mode_changes(history: History) -> None:
    out = history.run("diff", "2", "4").stdout.splitlines()

    assert "M src/main.py" in out
    assert "- src/util.py" in out
    assert "m data/blob.bin (644 -> 600)" in out
    document = history.json("diff", "1", "-1")
    kinds = {change["path"]: change["change"] for change in document["changes"]}
    assert kinds["README.md"] == "changed" and kinds["data/blob.bin"] == "mode"
    assert "src/util.py" not in kinds
    assert (document["from"], document["to"]) == (1, 4)


def test_diff_shows_a_directory_whose_mtime_append_recorded(tmp_path: Path) -> None:
    made = History(tmp_path)
    write(made.src / "folder" / "file", b"x")
    made.append("one")
    folder = made.src / "folder"
    os.utime(folder, ns=(0, folder.stat().st_mtime_ns + 5_000_000_000))
    second = made.append("two")

    assert second["changed"] == 1
    document = made.json("diff", "1", "2")
    assert [(c["path"], c["change"]) for c in document["changes"]] == [
        ("folder", "touched")
    ]


def test_diff_stat_prints_counts_only(history: History) -> None:
    result = history.run("diff", "1", "4", "--stat")

    assert result.stdout.strip() == "visit 1 -> 4: 2 changed, 1 mode, 1 touched"
    document = history.json("diff", "1", "2", "--stat")
    assert document["changes"] == [] and document["counts"]["added"] == 1


def test_diff_below_a_path_the_visits_lack_is_refused(history: History) -> None:
    result = history.run("diff", "1", "4", "nowhere", check=False)

    assert result.returncode == 1 and "nowhere" in one_error_line(result)


# -- materialize -----------------------------------------------------------------


def test_materialize_part_of_a_visit_counts_only_that_part(history: History) -> None:
    dest = history.root / "part"
    out = history.run("materialize", "--visit", "2", dest, "--path", "src").stdout

    assert "3 entries" in out, out
    assert_same_tree(history.copies[2] / "src", dest / "src")
    assert set(tree_state(dest)) == {b"src", b"src/main.py", b"src/util.py"}
    document = history.json(
        "materialize", "--visit", "3", history.root / "p3", "--path", "README.md"
    )
    assert (document["entries"], document["tree_bytes"]) == (1, 21)


def test_materialize_whole_visit_round_trips(history: History) -> None:
    for visit, copy in history.copies.items():
        dest = history.root / f"whole{visit}"
        document = history.json("materialize", "--visit", str(visit), dest)
        assert document["entries"] == len(tree_state(copy))
        assert_same_tree(copy, dest)


# -- naming visits ---------------------------------------------------------------


def test_a_numeric_message_is_named_with_msg_prefix(history: History) -> None:
    assert history.json("show", "msg:42")["visit"] == 2
    assert history.json("show", "after verify")["visit"] == 3
    assert history.json("show", "-2")["visit"] == 3

    result = history.run("show", "42", check=False)
    assert result.returncode == 1
    assert "there is no visit 42" in one_error_line(result)


def test_a_compacted_visit_is_named_with_the_kept_range(history: History) -> None:
    history.run("compact", "--keep-last", "2", "--quiet")
    result = history.run("show", "1", check=False)

    assert result.returncode == 1
    assert one_error_line(result).endswith(
        "visit 1 was compacted away; kept visits: 3-4"
    )


# -- append --dry-run ------------------------------------------------------------


def test_dry_run_predicts_the_append_and_writes_nothing(history: History) -> None:
    src = history.src
    write(src / "new.txt", b"brand new\n" * 100)
    write(src / "src" / "main.py", b"print('changed again')\n")
    (src / "README.md").unlink()
    os.chmod(src / "data" / "blob.bin", 0o640)
    before = store_files(history.store)

    preview = history.json("append", src, "--dry-run")
    text = history.run("append", src, "--dry-run").stdout

    assert store_files(history.store) == before
    assert preview["paths"] == {
        "added": ["new.txt"],
        "changed": ["data/blob.bin", "src/main.py"],
        "metadata_only": ["data/blob.bin"],
        "deleted": ["README.md"],
    }
    assert preview["new_bytes"] == 1000 + len(b"print('changed again')\n")
    assert (
        "+ new.txt" in text and "- README.md" in text and "nothing was written" in text
    )
    assert "m data/blob.bin" in text and "M src/main.py" in text
    real = history.append("real")
    assert real["metadata_only"] == preview["metadata_only"] == 1
    assert (real["visit"], real["added"], real["changed"], real["deleted"]) == (
        preview["visit"],
        preview["added"],
        preview["changed"],
        preview["deleted"],
    )


def test_dry_run_without_a_store_creates_none(tmp_path: Path) -> None:
    write(tmp_path / "src" / "a", b"abc")
    store = tmp_path / "store"
    preview = run_json(
        "append", tmp_path / "src", "--store", store, "--dry-run", "--json"
    )

    assert not store.exists()
    assert (preview["visit"], preview["added"], preview["new_bytes"]) == (1, 1, 3)


def test_dry_run_counts_known_content_as_deduplicated(history: History) -> None:
    shutil.copy(history.src / "data" / "blob.bin", history.src / "copy.bin")
    preview = history.json("append", history.src, "--dry-run")

    assert preview["new_bytes"] == 0
    assert preview["deduplicated_bytes"] == 256 * 64


# -- errors and usage ------------------------------------------------------------


def test_bad_option_prints_the_commands_own_usage(history: History) -> None:
    result = history.run("diff", "1", "2", "--bogus", check=False)

    assert result.returncode == 2
    assert result.stderr.startswith("usage: deltatar diff ")
    assert "unrecognized arguments: --bogus" in result.stderr


def test_mistyped_command_suggests_the_right_one() -> None:
    result = run_cli("lgo", check=False)

    assert result.returncode == 2
    assert "'lgo' is not a deltatar command; did you mean 'log'?" in result.stderr


def test_a_directory_that_is_not_a_store_is_named(tmp_path: Path) -> None:
    result = run_cli("log", "--store", tmp_path, check=False)

    assert result.returncode == 1
    line = one_error_line(result)
    assert str(tmp_path) in line and "not a deltatar store" in line


def test_a_source_directory_given_as_store_names_the_store(history: History) -> None:
    inside = history.src / ".deltatar"
    run_cli("append", history.src, "--store", inside, "-q")
    result = run_cli("log", "--store", history.src, check=False)

    assert result.returncode == 1
    assert one_error_line(result).endswith(f"did you mean --store {inside}?")


def test_log_draws_in_ascii_where_stdout_cannot_encode_blocks(
    history: History,
) -> None:
    ascii_only = {"PYTHONIOENCODING": "ascii", "LC_ALL": "C"}
    result = history.run("log", env=ascii_only)

    assert result.stderr == "" and "##########" in result.stdout
    result.stdout.encode("ascii")


def test_errors_with_json_also_print_an_error_document(history: History) -> None:
    result = history.run("show", "9", "--json", check=False)

    assert result.returncode == 1
    import json

    document = json.loads(result.stdout)
    assert document["error"]["type"] == "VisitNotFound"
    assert document["error"]["exit_code"] == 1
    assert document["error"]["message"] in result.stderr


def test_debug_shows_the_traceback(history: History) -> None:
    result = history.run("show", "9", "--debug", check=False)

    assert result.returncode == 1 and "Traceback" in result.stderr


def test_store_is_required(tmp_path: Path) -> None:
    result = run_cli("log", check=False)

    assert result.returncode == 2
    assert result.stderr.startswith("usage: deltatar log ")
    assert "--store is required" in result.stderr


def test_common_options_work_before_the_command(history: History) -> None:
    document = run_json("--store", history.store, "--json", "show", "-1")

    assert document["visit"] == 4


# -- pipelines and logging -------------------------------------------------------


def test_a_pipeline_sees_no_progress_and_quiet_means_silent(tmp_path: Path) -> None:
    write(tmp_path / "src" / "a", b"a" * 10000)
    appended = run_cli("append", tmp_path / "src", "--store", tmp_path / "s")
    quiet = run_cli("append", tmp_path / "src", "--store", tmp_path / "s", "-q")

    assert appended.stderr == "" and appended.stdout.startswith("visit 1: 1 added")
    assert quiet.stdout == "" and quiet.stderr == ""


def test_verbose_and_log_level_drive_logging(tmp_path: Path) -> None:
    write(tmp_path / "src" / "a", b"a")
    store = tmp_path / "s"
    verbose = run_cli("append", tmp_path / "src", "--store", store, "-v")
    chosen = run_cli("log", "--store", store, "--log-level", "INFO", "-q")
    silent = run_cli(
        "append", tmp_path / "src", "--store", store, "--log-level", "error"
    )

    assert "deltatar: info: visit 1 appended" in verbose.stderr
    assert chosen.returncode == 0 and chosen.stdout == ""
    assert silent.stderr == ""


def test_a_closed_pipe_ends_quietly(history: History) -> None:
    for number in range(300):
        write(history.src / "many" / f"file{number:04}", b"x")
    history.append("many")
    command = " ".join(
        f"'{os.fsdecode(part)}'" for part in cli_command("ls", "--store", history.store)
    )
    done = subprocess.run(
        f"{command} | head -n 1",
        shell=True,
        env=cli_env(),
        capture_output=True,
        text=True,
        check=True,
    )

    assert done.stdout.count("\n") == 1
    assert "Traceback" not in done.stderr and "Error" not in done.stderr


# -- help and completion ---------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_examples(command: str) -> None:
    out = run_cli(command, "--help").stdout

    assert out.startswith(f"usage: deltatar {command}")
    assert "examples:" in out and f"deltatar {command}" in out.split("examples:")[1]


def test_top_level_help_has_a_tour_and_exit_codes() -> None:
    out = run_cli("--help").stdout

    assert "a short tour" in out and "exit status" in out


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_completion_script_names_every_command(shell: str) -> None:
    script = run_cli("completion", shell).stdout

    for command in COMMANDS:
        assert command in script
    checker = shutil.which(shell)
    # Fail, never skip: scripts/test installs the shell where it can.
    assert checker is not None, f"{shell} is not installed to check the script's syntax"
    checked = subprocess.run(
        [checker, "-n"], input=script, text=True, capture_output=True
    )
    assert checked.returncode == 0, checked.stderr


# -- the JSON contract -----------------------------------------------------------


def documented_fields() -> dict[str, tuple[set[str], set[str]]]:
    """Per section of docs/json.md: (every documented field, the optional ones)."""
    sections: dict[str, tuple[set[str], set[str]]] = {}
    current = None
    for line in JSON_DOC.read_text().splitlines():
        heading = re.match(r"## `([a-z -]+)`|## (.+)", line)
        if heading:
            current = (heading.group(1) or heading.group(2)).strip()
            sections[current] = (set(), set())
            continue
        row = re.match(r"\| `([a-z_.\[\]]+)` \| [^|]+ \| (.*) \|$", line)
        if row and current is not None:
            sections[current][0].add(row.group(1))
            if row.group(2).startswith("*optional*"):
                sections[current][1].add(row.group(1))
    return sections


def field_names(document, prefix: str = "") -> set[str]:
    """``visits[].stored.new_bytes`` style names of every field in a document."""
    names: set[str] = set()
    for key, value in document.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            names |= field_names(value, f"{name}.")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            names.add(name)
            for item in value:
                names |= field_names(item, f"{name}[].")
        else:
            names.add(name)
    return names


def check_against_doc(document: dict, *sections: str) -> None:
    doc = documented_fields()
    documented = {"schema_version"}.union(*(doc[s][0] for s in sections))
    optional = set().union(*(doc[s][1] for s in sections))
    record = doc["Visit records"][0]
    if "visits" in documented and "visits[].visit" not in documented:
        documented |= {f"visits[].{name}" for name in record}
    actual = field_names(document)
    assert actual - documented == set(), "fields missing from docs/json.md"
    assert documented - optional - actual == set(), "documented fields not printed"


def test_every_json_document_matches_docs_json_md(history: History) -> None:
    root = history.root
    record_sections = ("Visit records",)
    checks = [
        (history.json("log"), ("log",)),
        (history.json("show", "3"), (*record_sections, "show")),
        (history.json("ls", "--visit", "1"), ("ls",)),
        (history.json("cat", "README.md"), ("cat",)),
        (history.json("diff", "1", "4"), ("diff",)),
        (history.json("stats"), ("stats",)),
        (history.json("verify", "--quick"), ("verify",)),
        (history.json("compact", "--dry-run"), ("compact",)),
        (history.json("materialize", root / "m"), ("materialize",)),
        (history.json("append", history.src, "--dry-run"), ("append --dry-run",)),
        (history.json("append", history.src), (*record_sections, "append")),
    ]
    for document, sections in checks:
        assert document["schema_version"] == 1, sections
        check_against_doc(document, *sections)


def test_config_json_carries_the_schema_version(history: History) -> None:
    document = history.json("config")

    assert document["schema_version"] == 1 and document["level"] >= 1
