"""Every code example in README.md runs as written, against the session's local S3 server.

Reading the README
    * A fenced block tagged ``python`` is a Python example, one tagged ``bash`` holds shell
      commands (one per line; a trailing ``\\`` continues a command). Untagged blocks are
      diagrams and listings, not code. A block with any other tag fails (``unknown-language``)
      until this module knows how to run it, so no example can be added without being run.
    * A block belongs to the innermost heading above it: its *section*.

Running the examples (one test per Python section, one per shell command)
    * Python: the blocks of one section run in order in one namespace, in a fresh interpreter
      (``sys.executable``). A section may build on the introductory example of a section that
      encloses it (``### fastfeed.DataLoader`` iterates ``ds`` from the ``## Use`` example): when
      its code uses names it does not define, the blocks placed directly under each enclosing
      heading (before its first subheading) run first, in the same namespace. Tracebacks name
      README.md and its line numbers.
    * Shell: each command runs with ``bash -e``, after the earlier commands of its block (so
      ``fastfeed shards manifest`` lists what ``fastfeed shards write`` just wrote).
    * Commands that cannot run here are listed in ``SKIP``, with the reason, and reported as
      skipped; examples that fail because of a known bug in fastfeed are in ``KNOWN_BUGS``
      (a strict xfail: the test fails as soon as the bug is fixed, to remove the entry).
      ``test_readme_tables_name_real_examples`` keeps both tables current.

What each test gets
    * The standard AWS environment pointing at the ``seaweed`` fixture's SeaweedFS server on
      127.0.0.1 (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
      ``AWS_DEFAULT_REGION``), which the examples rely on instead of a hard-coded endpoint;
      ``HOME`` in a fresh directory; the interpreter's ``bin`` directory first on ``PATH`` (the
      ``fastfeed`` command). Nothing but 127.0.0.1 is contacted.
    * A fresh, empty temporary working directory holding ``photos/<class>/<name>.jpg`` (the
      input of the shard-writing examples).
    * Every bucket any README example names (``s3://<bucket>/...``), created empty for the test
      and deleted after it, with synthetic WebDataset shards (``.jpg`` + ``.cls`` samples, as the
      README's examples read them) under each URL of ``DATASETS``, except in the sections of
      ``WRITE_THEIR_OWN_DATA``.

Checks: exit status 0 within ``TIMEOUT_S``; no WARNING or ERROR logged by fastfeed; no process
left running. Every process a test starts is stopped when it ends, also on failure or timeout.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import symtable
import sys
import tarfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from fastfeed.testing.servers import SeaweedServer
from fastfeed.testing.shards import upload_dir, write_synthetic_shards

README = Path(__file__).resolve().parents[1] / "README.md"

#: Seconds one Python section or one shell command (with the earlier commands of its block) may run.
TIMEOUT_S = 150.0
#: Seconds the processes an example started get to exit after it did.
EXIT_GRACE_S = 10.0

#: Datasets the examples read: synthetic shards are uploaded here before each test.
DATASETS = ("s3://my-bucket/train/", "s3://bucket/train/")
#: Sections whose examples write the datasets above themselves (a pre-existing dataset there
#: would be refused), by heading text.
WRITE_THEIR_OWN_DATA = {"Writing shards": "`fastfeed shards write` and write_shards() create s3://bucket/train/"}

#: Shell commands not run here (the start of the command, as shell words), with the reason.
SKIP = {
    "scripts/demo": "creates ./.venv and runs `fastfeed bench --demo` at full size (minutes); "
    "`fastfeed bench --demo` is skipped below, and tests/test_cli.py runs the demo end to end at a small size",
    "scripts/test": "runs this test suite (CI runs it: .ci/run); running it from inside the suite would recurse",
    "fastfeed bench --demo": "a long benchmark: writes and reads a 256 MiB dataset through fastfeed and every "
    "installed peer (minutes on 2 cores); tests/test_cli.py runs the same demo end to end at 8 MiB",
}

#: Examples that fail because of a bug in fastfeed (start of a shell command, or ``py:<section>``
#: for a Python section), with the bug. Marked as a strict xfail: fixing the bug fails the test.
KNOWN_BUGS: dict[str, str] = {}

#: How fastfeed's log lines look: the CLI's format, and the handler the Python runner installs.
_FASTFEED_PROBLEM = re.compile(r"^(WARNING|ERROR|CRITICAL) fastfeed\b.*$", re.MULTILINE)
_BUCKET = re.compile(r"s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])/")
#: Environment variable that marks every process an example starts (found by /proc/<pid>/environ).
_MARKER = "FASTFEED_README_EXAMPLE"

# Runs the blocks of one Python section (a JSON list in argv[1]) in one namespace, compiled with
# README.md's path and line numbers; logs fastfeed's warnings in the CLI's format.
_RUNNER = """
import json, logging, sys
handler = logging.StreamHandler()
handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
handler.setLevel(logging.WARNING)
logging.getLogger("fastfeed").addHandler(handler)
namespace = {"__name__": "__main__", "__builtins__": __builtins__}
with open(sys.argv[1]) as fh:
    blocks = json.load(fh)
for block in blocks:
    exec(compile("\\n" * (block["line"] - 1) + block["code"], block["path"], "exec"), namespace)
"""


# -- reading the README ------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    lang: str
    line: int  # README line of the block's first code line
    code: str
    section: tuple[str, ...]  # heading texts, outermost first


@dataclass(frozen=True)
class Command:
    text: str  # as written, continuation lines included
    line: int
    words: tuple[str, ...]  # shell words, comments dropped


@dataclass(frozen=True)
class Example:
    id: str
    kind: str  # "python", "bash" or "unknown-language"
    section: tuple[str, ...]
    line: int
    blocks: tuple[Block, ...] = ()  # python: what runs, in order (enclosing introductions first)
    commands: tuple[Command, ...] = ()  # bash: the earlier commands of the block, then this one
    skip: str | None = None
    bug: str | None = None


def parse_blocks(text: str) -> list[Block]:
    """The fenced code blocks of a Markdown text, with their sections."""
    blocks: list[Block] = []
    section: list[tuple[int, str]] = []  # (level, title)
    fence: tuple[str, int, list[str]] | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        if fence is not None:
            if line.strip() == "```":
                lang, start, body = fence
                code = "\n".join(body) + "\n"
                blocks.append(Block(lang, start, code, tuple(title for _, title in section)))
                fence = None
            else:
                fence[2].append(line)
        elif line.startswith("```"):
            fence = (line[3:].strip().lower(), number + 1, [])
        elif m := re.match(r"(#{1,6}) +(.+?) *#*$", line):
            level = len(m.group(1))
            section = [s for s in section if s[0] < level] + [(level, m.group(2).strip())]
    if fence is not None:
        raise ValueError(f"README.md: the code block opened at line {fence[1] - 1} is never closed")
    return blocks


def split_commands(block: Block) -> list[Command]:
    """The commands of a shell block: one per line, ``\\`` continues a line."""
    commands: list[Command] = []
    lines = block.code.splitlines()
    i = 0
    while i < len(lines):
        start, parts = i, [lines[i]]
        while parts[-1].rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            parts.append(lines[i])
        i += 1
        text = "\n".join(parts)
        words = tuple(shlex.split(text.replace("\\\n", " "), comments=True))
        if words:
            commands.append(Command(text, block.line + start, words))
    return commands


def free_names(code: str) -> set[str]:
    """Names ``code`` reads (at module level or as globals of its functions) without defining them."""
    top = symtable.symtable(code, "<example>", "exec")
    defined = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported() or s.is_namespace()}
    used: set[str] = set()

    def walk(table: symtable.SymbolTable) -> None:
        for sym in table.get_symbols():
            if sym.is_referenced() and (table is top or sym.is_global()):
                used.add(sym.get_name())
        for child in table.get_children():
            walk(child)

    walk(top)
    return used - defined - set(dir(builtins))


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-")


def _section_id(section: tuple[str, ...]) -> str:
    return "/".join(_slug(title) for title in section[1:]) or "top"  # the README's title is every section's root


def _matches(words: tuple[str, ...], key: str) -> bool:
    prefix = tuple(shlex.split(key))
    return words[: len(prefix)] == prefix


def collect(text: str) -> list[Example]:
    """The README's examples, in README order."""
    blocks = parse_blocks(text)
    examples: list[Example] = []
    seen_sections: set[tuple[str, ...]] = set()
    for block in blocks:
        if block.lang == "":
            continue  # a diagram or a listing
        sec_id = _section_id(block.section)
        if block.lang in ("python", "py"):
            if block.section in seen_sections:
                continue  # the section's blocks run together, from its first block
            seen_sections.add(block.section)
            own = tuple(b for b in blocks if b.lang in ("python", "py") and b.section == block.section)
            intro: tuple[Block, ...] = ()
            if free_names("".join(b.code for b in own)):
                intro = tuple(
                    b
                    for depth in range(1, len(block.section))
                    for b in blocks
                    if b.lang in ("python", "py") and b.section == block.section[:depth]
                )
            py_id = f"py:{sec_id}"
            examples.append(
                Example(py_id, "python", block.section, block.line, blocks=intro + own, bug=KNOWN_BUGS.get(py_id))
            )
        elif block.lang in ("bash", "sh", "shell", "console"):
            commands = split_commands(block)
            for n, command in enumerate(commands):
                skip = next((why for key, why in SKIP.items() if _matches(command.words, key)), None)
                bug = next((why for key, why in KNOWN_BUGS.items() if _matches(command.words, key)), None)
                earlier = tuple(
                    c for c in commands[:n] if not any(_matches(c.words, key) for key in SKIP)
                )  # what this command builds on
                name = _slug(" ".join(command.words[:3]).replace("/", " "))
                examples.append(
                    Example(
                        f"sh:{sec_id}:{name}",
                        "bash",
                        block.section,
                        command.line,
                        commands=(*earlier, command),
                        skip=skip,
                        bug=bug,
                    )
                )
        else:
            examples.append(
                Example(f"{block.lang}:{sec_id}:line-{block.line}", "unknown-language", block.section, block.line)
            )
    return examples


README_TEXT = README.read_text(encoding="utf-8")
EXAMPLES = collect(README_TEXT)
BUCKETS = sorted(
    {m.group(1) for b in parse_blocks(README_TEXT) if b.lang for m in _BUCKET.finditer(b.code)}
    | {m.group(1) for url in DATASETS for m in _BUCKET.finditer(url)}
)


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def readme_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``(shards, photos)``: a synthetic WebDataset (4 shards x 64 samples of ~2 KiB noise JPEG
    + ASCII label) and ``photos/<class>/<name>.jpg`` (16 of those JPEGs in two classes)."""
    base = tmp_path_factory.mktemp("readme-data")
    shards = base / "shards"
    paths = write_synthetic_shards(
        shards, num_shards=4, samples_per_shard=64, sample_bytes=2048, extensions=("jpg", "cls")
    )
    photos = base / "photos"
    with tarfile.open(paths[0]) as tar:
        jpegs = [m for m in tar.getmembers() if m.name.endswith(".jpg")][:16]
        for i, member in enumerate(jpegs):
            fh = tar.extractfile(member)
            assert fh is not None
            dest = photos / ("cat", "dog")[i % 2] / member.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(fh.read())
    return shards, photos


def _reset_bucket(client: Any, name: str, *, create: bool) -> None:
    """Delete bucket ``name`` with its contents if it exists (SeaweedFS deletes non-empty buckets);
    then create it empty if ``create``."""
    with contextlib.suppress(client.exceptions.NoSuchBucket):
        client.delete_bucket(Bucket=name)
    if create:
        client.create_bucket(Bucket=name)


@pytest.fixture
def example_env(tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    """``(cwd, env)`` for one example, with its buckets and data in place (removed after);
    None for an example that will not run (the server is not even started for it)."""
    example: Example = request.node.callspec.params["example"]
    if example.skip is not None or example.kind not in ("python", "bash"):
        yield None
        return
    seaweed: SeaweedServer = request.getfixturevalue("seaweed")
    shards, photos = request.getfixturevalue("readme_data")
    client = seaweed.client()
    for name in BUCKETS:
        _reset_bucket(client, name, create=True)
    if example.section[-1] not in WRITE_THEIR_OWN_DATA:
        for url in DATASETS:
            bucket, _, prefix = url.removeprefix("s3://").partition("/")
            upload_dir(client, bucket, shards, prefix)
    cwd, home = tmp_path / "work", tmp_path / "home"
    home.mkdir()
    cwd.mkdir()
    shutil.copytree(photos, cwd / "photos")
    env = {
        **os.environ,  # AWS_* already removed by conftest's _clean_aws_env
        "AWS_ENDPOINT_URL": seaweed.endpoint_url,
        "AWS_ACCESS_KEY_ID": seaweed.access_key,
        "AWS_SECRET_ACCESS_KEY": seaweed.secret_key,
        "AWS_DEFAULT_REGION": seaweed.region,
        "HOME": str(home),
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "PYTHONUNBUFFERED": "1",
        "PYTHONFAULTHANDLER": "1",  # a stuck example's Python processes print their stacks (SIGABRT)
    }
    try:
        yield cwd, env
    finally:
        for name in BUCKETS:
            _reset_bucket(client, name, create=False)


# -- running -------------------------------------------------------------------------------------


class FastfeedLoggedProblems(AssertionError):
    """The example ran, but fastfeed logged warnings or errors."""


def _marked(marker: str) -> list[psutil.Process]:
    """Live processes started by the example run tagged with ``marker``."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and proc.environ().get(_MARKER) == marker:
                found.append(proc)
        except psutil.Error:  # gone, or not ours
            continue
    return found


def _dump_stacks(marker: str) -> None:
    """Make each Python process of a stuck example print the stacks of its threads, one process
    at a time, newest first (they run with PYTHONFAULTHANDLER, which handles SIGABRT), so the
    output shows where it hangs."""
    procs = []
    for proc in _marked(marker):
        with contextlib.suppress(psutil.Error):
            if Path(proc.exe()).name.startswith("python"):
                procs.append((proc.create_time(), proc))
    for _, proc in sorted(procs, key=lambda item: item[0], reverse=True):
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGABRT)
            proc.wait(timeout=3)


def _describe(proc: psutil.Process) -> str:
    try:
        return f"pid {proc.pid}: {' '.join(proc.cmdline())[:200]}"
    except psutil.Error:
        return f"pid {proc.pid} (gone)"


def run_example(argv: list[str], *, cwd: Path, env: dict[str, str], log: Path) -> tuple[int | None, str, list[str]]:
    """Run ``argv`` in its own session; return ``(exit status or None on timeout, output,
    processes it left running)``. Everything it started is killed before this returns."""
    marker = uuid.uuid4().hex
    with log.open("wb") as out:  # a file, not a pipe: a leftover process cannot hold the read open
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env={**env, _MARKER: marker},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    rc: int | None
    left: list[str] = []
    try:
        try:
            rc = proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            rc = None
            _dump_stacks(marker)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        deadline = time.monotonic() + EXIT_GRACE_S
        while (rest := _marked(marker)) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [_describe(p) for p in rest] if rc is not None else []
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the rest of its process group
        for rest_proc in _marked(marker):  # and whatever left the group
            with contextlib.suppress(psutil.Error):
                rest_proc.kill()
    return rc, log.read_text(encoding="utf-8", errors="replace"), left


def _params() -> list[Any]:
    params = []
    for example in EXAMPLES:
        marks = []
        if example.bug is not None:
            marks.append(pytest.mark.xfail(reason=example.bug, raises=FastfeedLoggedProblems, strict=True))
        params.append(pytest.param(example, id=example.id, marks=marks))
    return params


@pytest.mark.parametrize("example", _params())
def test_readme_example(example: Example, example_env: tuple[Path, dict[str, str]] | None, tmp_path: Path) -> None:
    where = f"README.md line {example.line} ({' > '.join(example.section[1:]) or example.section[0]})"
    if example.kind == "unknown-language":
        pytest.fail(f"{example.id}: a code block this test cannot run; tag it python or bash (or untag a listing)")
    if example.skip is not None:
        pytest.skip(f"{where}: {example.skip}")
    assert example_env is not None
    cwd, env = example_env
    if example.kind == "python":
        blocks = [{"line": b.line, "code": b.code, "path": str(README)} for b in example.blocks]
        (tmp_path / "blocks.json").write_text(json.dumps(blocks))
        argv = [sys.executable, "-c", _RUNNER, str(tmp_path / "blocks.json")]
    else:
        argv = ["bash", "-e", "-o", "pipefail", "-c", "\n".join(c.text for c in example.commands)]
    rc, output, left = run_example(argv, cwd=cwd, env=env, log=tmp_path / "output.log")
    tail = output[-12000:]
    assert rc is not None, f"{where} did not finish in {TIMEOUT_S:.0f} s; output:\n{tail}"
    assert rc == 0, f"{where} exited with status {rc}; output:\n{tail}"
    assert not left, f"{where} left processes running {EXIT_GRACE_S:.0f} s after it exited:\n" + "\n".join(left)
    problems = [m.group(0) for m in _FASTFEED_PROBLEM.finditer(output)]
    if problems:
        lines = "\n".join(problems)
        raise FastfeedLoggedProblems(f"{where}: fastfeed logged:\n{lines}\n\noutput:\n{tail}")


def test_readme_tables_name_real_examples() -> None:
    """Every entry of SKIP, KNOWN_BUGS and WRITE_THEIR_OWN_DATA still names a README example, and
    the README still has examples of both kinds (so the parser did not silently find none)."""
    commands = [c.words for e in EXAMPLES if e.kind == "bash" for c in e.commands[-1:]]
    for key in [*SKIP, *(k for k in KNOWN_BUGS if not k.startswith("py:"))]:
        assert sum(_matches(words, key) for words in commands) == 1, f"{key!r} matches no single README command"
    ids = {e.id for e in EXAMPLES}
    for key in KNOWN_BUGS:
        assert not key.startswith("py:") or key in ids, f"{key!r} is not a README Python section"
    titles = {e.section[-1] for e in EXAMPLES}
    for title in WRITE_THEIR_OWN_DATA:
        assert title in titles, f"{title!r} is not a README section with examples"
    kinds = [e.kind for e in EXAMPLES]
    assert kinds.count("python") >= 5 and kinds.count("bash") >= 5, kinds
