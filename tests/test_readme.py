"""Every command in the README runs, at tiny scale, in a fresh folder, as a user would type it.

The commands come from the README's "Every stage, one example" block, so the README cannot drift
from the CLI. `lmloop serve` runs in the background while the conversations that the later
commands (feedback, loop) learn from are held over HTTP. The two `make` commands are the ones CI
and `tests/test_quickstart.py` exercise.
"""

from __future__ import annotations

import os
import random
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Every stage, one example", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [
        line.strip() for line in block.splitlines() if line.strip() and not line.startswith("#")
    ]


def test_readme_opens_with_the_two_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    first = re.search(r"```bash\n(.*?)```", text, re.S).group(1).splitlines()
    assert [line.split()[0:2] for line in first] == [["make", "demo"], ["make", "test"]]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci


def _corpus(folder: Path) -> None:
    rng = random.Random(0)
    words = ("once upon a time there was a little fox who found a red ball in the park and "
             "took it home to show the old owl who lived in a tall tree").split()  # fmt: skip
    folder.mkdir()
    for i in range(80):
        sentences = [
            " ".join(rng.choice(words) for _ in range(rng.randint(6, 14))) for _ in range(4)
        ]
        (folder / f"story-{i:03d}.txt").write_text(
            f"Story {i}. " + ". ".join(s.capitalize() for s in sentences) + ".\n"
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_every_readme_command_runs(tmp_path):
    commands = readme_commands()
    assert len(commands) >= 10
    _corpus(tmp_path / "my_texts")
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    env = {**os.environ, "LMLOOP_HOME": str(tmp_path / "home"), "LMLOOP_NO_PROGRESS": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # fmt: skip
    server = None
    try:
        for command in commands:
            if command.startswith("lmloop serve"):
                port = _free_port()
                log = (tmp_path / "serve.log").open("wb")
                argv = [*shlex.split(command), "--port", str(port)]
                server = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=log, stderr=log)
                url = f"http://127.0.0.1:{port}"
                _wait_healthy(server, url, tmp_path / "serve.log")
                _converse(url)
                continue
            done = subprocess.run(
                command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True,
                timeout=600,
            )  # fmt: skip
            assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    finally:
        if server is not None:
            server.terminate()
            assert server.wait(timeout=60) == 0
    assert (tmp_path / "exports" / "mine-hf" / "config.json").exists()
    assert (tmp_path / "reports" / "mine" / "report.json").exists()
    assert list((tmp_path / "runs" / "loop").glob("cycle-*/decision.json"))


def _wait_healthy(proc: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text(errors="replace")[-2000:]
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError("lmloop serve did not become healthy")


def _converse(url: str) -> None:
    """Conversations a user would have on the chat page, each answer rated and corrected."""
    for i in range(12):
        r = httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "model": "mine", "max_tokens": 12,
            "messages": [{"role": "user", "content": f"Tell me story {i} about the fox."}]})  # fmt: skip
        assert r.status_code == 200, r.text
        fb = httpx.post(url + "/v1/feedback", timeout=30, json={
            "response_id": r.json()["id"], "thumb": "down", "rating": 2,
            "correction": "Once upon a time a little fox found a red ball in the park."})  # fmt: skip
        assert fb.status_code == 200, fb.text
