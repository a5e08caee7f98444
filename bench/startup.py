"""How long `python app.py --model tiny` takes until its page answers, against the bare imports it cannot avoid.

The timing tests/test_browser.py leaves out (a test asserts what a start does, not how fast on a busy machine). Each
round starts the app in a fresh process on a free port and polls its page; beside it, in the same round, a fresh
process imports what the app imports (gradio, torch, diffusers through fluxdemo.studio) and exits. The ratio of the
two is the start's own cost over the imports, which a busy machine slows alike.

    python bench/startup.py [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMPORTS = "import gradio, fluxdemo.studio, fluxdemo.pipeline"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def page_seconds(env: dict[str, str]) -> float:
    """Seconds from starting app.py to its page's first 200."""
    port = free_port()
    start = time.perf_counter()
    app = subprocess.Popen([sys.executable, "app.py", "--model", "tiny", "--port", str(port)], cwd=ROOT, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1) as page:
                    if page.status == 200:
                        return time.perf_counter() - start
            except OSError:
                if app.poll() is not None:
                    raise SystemExit(f"app.py exited with {app.returncode}") from None
                time.sleep(0.05)
    finally:
        app.terminate()
        app.wait(timeout=60)


def import_seconds(env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", IMPORTS], cwd=ROOT, env=env, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "fluxdemo", "tiny"], cwd=ROOT, env=env, check=True)  # the kit, built once
    rounds = [{"page_s": page_seconds(env), "imports_s": import_seconds(env)} for _ in range(args.rounds)]
    for r in rounds:
        r["ratio"] = r["page_s"] / r["imports_s"]
    page, imports = (statistics.median(r[k] for r in rounds) for k in ("page_s", "imports_s"))
    ratio = statistics.median(r["ratio"] for r in rounds)
    print(f"page up after {page:.1f} s; the imports alone {imports:.1f} s; ratio {ratio:.2f} (medians)")
    if args.json:
        Path(args.json).write_text(json.dumps(rounds, indent=2))


if __name__ == "__main__":
    main()
