"""The README's example runs as written, and its two commands are the ones CI runs."""

import importlib.util
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def test_python_examples_run(capsys):
    examples = _blocks("python")
    assert len(examples) >= 2
    for example in examples:
        if "transformers" in example and importlib.util.find_spec("transformers") is None:
            continue  # the attnkit[hf] example needs the optional extra
        exec(compile(example, str(README), "exec"), {})
    assert "ApproximationError" in capsys.readouterr().out


def test_ci_runs_the_readme_test_command():
    bash = _blocks("bash")
    assert 'pip install -e ".[dev]" && pytest\n' in bash
    ci = (README.parent / ".ci" / "run").read_text()
    assert 'pip install -e ".[dev]" && pytest' in ci
