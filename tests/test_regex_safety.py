"""Every regular expression in fluxdemo runs in linear time on hostile text (issue 16: a public link lets anyone
hand the app a file or a string, and one backtracking pattern holds the GIL for seconds).

The patterns are found with `ast` (every re.compile/match/search/fullmatch/sub/findall/finditer/split call with a
literal pattern) and run, as their call sites use them, on inputs built to make backtracking patterns quadratic:
long runs of one character or separator without what the pattern needs to finish. No wall-clock limit: each case is
timed (in CPU time, which other work on the machine does not take) at a length L and at 16L in one process, and a
linear pattern's times grow about 16-fold where a quadratic one's grow 256-fold. Each pattern runs in a child process
with a CPU-time limit, so an exponential one fails instead of hanging the suite. A self-test checks that the
detector flags a known quadratic pattern.

Why 16L and a bound of 96: CPU time is not free of other work either (a run that spans a context switch finds its
caches cold and is charged for refilling them), and beside two busy loops a linear pattern measured 24 at 8L, against
a bound of 32 there. Sizes further apart widen the gap between the two kinds: the bound sits 6x above a linear
pattern's 16 and 2.7x below a quadratic one's 256 (at 8L it was 4x and 2x). L is where a call takes a quarter of a
millisecond (half that of before), so the long run costs what it did at 8L and the suite is no slower.
"""

from __future__ import annotations

import ast
import json
import re
import resource
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fluxdemo"
FUNCTIONS = {"compile", "match", "search", "fullmatch", "sub", "subn", "findall", "finditer", "split"}
# How each call runs the pattern: the scanning ones (sub, split, finditer) try every start position as findall does.
AS_CALLED = {"match": "match", "search": "search", "fullmatch": "fullmatch"} | dict.fromkeys(
    ("findall", "finditer", "sub", "subn", "split"), "findall"
)
FLAGS_AT = {"compile": 1, "match": 2, "search": 2, "fullmatch": 2, "findall": 2, "finditer": 2, "split": 3, "sub": 4}
GROWTH = 16  # the long input is GROWTH times the short one
MAX_RATIO = 96  # t(16L) / t(L): about 16 for a linear pattern, about 256 for a quadratic one (see the docstring)
CPU_LIMIT_S = 60  # CPU seconds per pattern, every input and call included; a linear pattern needs a second or two
CHILD_WALL_S = 1200  # wall seconds: only a hang guard, since a busy machine gives the child a small share of a core
# Hostile inputs, as repeating units: runs of whitespace, of each character class, and of nested separators. The
# characters a pattern spells literally are added to its own list (see _inputs).
UNITS = (" ", "\t", "\n", "a", "0", "_", ".", "-", "/", "a/", "\\", "a\\", ":", "a:", "a: ", "<lora:", '"', '\\"',
         "a,", "a ", "~/", "a.", "a_", "a-", "a=")  # fmt: skip


@dataclass(frozen=True)
class Found:
    """One literal pattern of the package, where it is, and how its call sites run it."""

    where: str  # file:line
    pattern: str
    flags: int
    calls: tuple[str, ...]  # match / search / fullmatch / findall


def _flags(node: ast.expr | None) -> int:
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "re":
        return int(getattr(re, node.attr))
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _flags(node.left) | _flags(node.right)
    return 0


def _re_call(node: ast.AST) -> str | None:
    """The function of an `re.<function>("literal", ...)` call, else None."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in FUNCTIONS):
        return None
    if not (isinstance(node.func.value, ast.Name) and node.func.value.id == "re" and node.args):
        return None
    return node.func.attr if isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str) else None


def _patterns_in(path: Path) -> list[Found]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    methods: dict[str, set[str]] = {}  # NAME -> the methods called as NAME.method(...) in this file
    named: dict[int, str] = {}  # id(re.compile call) -> the name it is assigned to
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.attr in AS_CALLED:
            methods.setdefault(node.value.id, set()).add(AS_CALLED[node.attr])
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            named[id(node.value)] = node.targets[0].id
    found = []
    for node in ast.walk(tree):
        function = _re_call(node)
        if function is None:
            continue
        at = FLAGS_AT.get(function, 99)
        flags = (
            node.args[at] if len(node.args) > at else next((k.value for k in node.keywords if k.arg == "flags"), None)
        )
        if function == "compile":  # how the name it is bound to is used; every way when it is not bound to one
            calls = methods.get(named.get(id(node), ""), set()) or {"search", "fullmatch", "findall"}
        else:
            calls = {AS_CALLED.get(function, "findall")}
        where = f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
        found.append(Found(where, node.args[0].value, _flags(flags), tuple(sorted(calls))))
    return found


PATTERNS = [found for path in sorted(PACKAGE.rglob("*.py")) for found in _patterns_in(path)]

# The child: for each input and call, the length L at which the call takes about a quarter of a millisecond (doubling
# from 256 characters), then the best of three runs at 16L against the best at L (measured again beside it, so a busy
# moment slows both): a linear pattern's time grows as the length does, a quadratic one's as its square (a cubic one
# takes a second at 16L, an exponential one meets the CPU limit). A flagged case is measured once more before it
# counts; the first case that counts ends the run.
CHILD = r"""
import json, re, sys, time
spec = json.loads(sys.stdin.read())
pattern = re.compile(spec["pattern"], spec["flags"])
TARGET, FLOOR, MAX_L, MAX_RATIO, K = 2.5e-4, 6.25e-5, 2**16, spec["max_ratio"], spec["growth"]

def run(call, text, times=1):
    best = float("inf")
    for _ in range(times):
        start = time.thread_time()  # CPU time: other processes on a busy machine do not count in it
        getattr(pattern, call)(text)
        best = min(best, time.thread_time() - start)
    return best

def ratio(call, unit):
    length = 256
    while run(call, unit * (length // len(unit))) < TARGET and length < MAX_L:
        length *= 2
    short = unit * (length // len(unit))
    t = max(run(call, short, 3), FLOOR)
    tk = run(call, unit * (K * length // len(unit)), 3)
    t = max(min(t, run(call, short, 3)), FLOOR)  # measured again beside the long one: a busy moment hits both
    return tk / t, length, t, tk, K

slow = []
for unit in spec["units"]:
    for call in spec["calls"]:
        r = ratio(call, unit)
        if r[0] > MAX_RATIO:
            r = min(r, ratio(call, unit))
        if r[0] > MAX_RATIO:
            slow.append({"unit": unit, "call": call, "ratio": r[0], "length": r[1], "t": r[2], "tk": r[3], "k": r[4]})
            break
    if slow:
        break
print(json.dumps(slow))
"""


def _inputs(pattern: str) -> list[str]:
    """UNITS, plus runs of each character the pattern spells literally (alone and after a letter) and of each word it
    spells ("flux" for r"flux.*fill": a run of the start of a match that never finishes)."""
    literal = {c for c in pattern if c.isprintable() and c not in "()[]{}?*+|^$\\"}
    words = set(re.findall(r"[A-Za-z_]{3,}", pattern))
    return sorted(set(UNITS) | literal | {"a" + c for c in literal} | words | {w + " " for w in words})


def measure(pattern: str, flags: int, calls: tuple[str, ...]) -> list[dict]:
    """The first hostile input and call whose time grows super-linearly (none: []); fails the test past CPU_LIMIT_S
    of the child's CPU time (the kernel stops it), which other work on the machine does not use up."""
    spec = {
        "pattern": pattern,
        "flags": flags,
        "calls": calls,
        "units": _inputs(pattern),
        "max_ratio": MAX_RATIO,
        "growth": GROWTH,
    }
    out = subprocess.run([sys.executable, "-c", CHILD], input=json.dumps(spec), capture_output=True, text=True,
                         timeout=CHILD_WALL_S, preexec_fn=_cpu_limit)  # fmt: skip
    if out.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        pytest.fail(f"{pattern!r} did not finish its hostile inputs in {CPU_LIMIT_S} CPU seconds: it backtracks "
                    "without bound.")  # fmt: skip
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _cpu_limit() -> None:
    resource.setrlimit(resource.RLIMIT_CPU, (CPU_LIMIT_S, CPU_LIMIT_S + 5))  # SIGXCPU, then SIGKILL


def _slow(results: list[dict]) -> list[str]:
    return [f"{r['call']} on {r['unit']!r} x {r['length'] // len(r['unit']):,}: {r['t'] * 1e3:.2f} ms, "
            f"{r['k']}x as long {r['tk'] * 1e3:.1f} ms" for r in results]  # fmt: skip


def test_the_detector_flags_a_quadratic_pattern():
    """The A1111 settings pattern images.py had until issue 16 (quadratic in findall on a run of word characters)."""
    old_a1111_item = r'\s*([\w ]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)'
    assert _slow(measure(old_a1111_item, 0, ("findall",)))


def test_the_detector_passes_a_linear_pattern():
    assert not _slow(measure(r"[\w.-]+", 0, ("findall", "fullmatch", "search")))


def test_every_pattern_is_found():
    """The collection itself: a pattern bound to a name reports how its name is called."""
    by_where = {(Path(f.where).name.split(":")[0], f.pattern): f.calls for f in PATTERNS}
    assert len(PATTERNS) >= 20
    assert by_where[("upload.py", r"[^A-Za-z0-9._-]+")] == ("findall",)  # re.sub


@pytest.mark.timeout(CHILD_WALL_S + 60)
@pytest.mark.parametrize("found", [pytest.param(f, id=f.where) for f in PATTERNS])
def test_pattern_is_linear_on_hostile_input(found: Found):
    slow = _slow(measure(found.pattern, found.flags, found.calls))
    assert not slow, f"{found.where}: {found.pattern!r} is super-linear: " + "; ".join(slow)
