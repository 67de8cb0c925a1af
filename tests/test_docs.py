"""Every python snippet of docs/*.md runs as written (issue 27: two failed with NameError), each on its own
(a snippet defines what it uses), as tests/test_readme.py runs the README's."""

from __future__ import annotations

import importlib.util
import re
import socket
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _snippets() -> list[tuple[str, int, str]]:
    out = []
    for path in sorted(DOCS.glob("*.md")):
        for i, block in enumerate(re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)):
            out.append((path.name, i, block))
    return out


SNIPPETS = _snippets()


def test_docs_have_snippets():
    assert len(SNIPPETS) >= 4 and {name for name, _, _ in SNIPPETS} >= {"long-context.md", "transformers.md"}


@pytest.mark.parametrize("name,index,code", SNIPPETS, ids=[f"{n}[{i}]" for n, i, _ in SNIPPETS])
def test_doc_snippet_runs(name, index, code, monkeypatch, capsys):
    if "transformers" in code and importlib.util.find_spec("transformers") is None:
        pytest.skip("the attnkit[hf] example needs the optional extra")
    if "init_process_group" in code:
        # A torchrun script: run it as one process (rank 0 of 1) on gloo, at its own sizes.
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(port)}.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    exec(compile(code, f"docs/{name}[{index}]", "exec"), {"__name__": "__docs__"})
