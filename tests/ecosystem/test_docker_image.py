"""The container images (Dockerfile: CUDA; Dockerfile.cpu: slim) install kvasir with the
Makefile's setup steps, run as a non-root user, expose the port ``kvasir serve`` listens
on, check /health, and pass their arguments to ``kvasir serve``. (No image is built here:
this machine has no container daemon.)"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from kvasir.entrypoints.cli import build_parser

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = ["Dockerfile", "Dockerfile.cpu"]


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, argument) pairs with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _pip_installs(lines: list[str]) -> list[list[str]]:
    """The argument lists of every ``pip install`` in ``lines``, normalised: make's
    ``$(X)`` as ``$X``; ``-e`` (a development install) and the ``[test]`` extra dropped."""
    out = []
    for line in lines:
        for m in re.finditer(r"pip install (.*?)(?:$|\|\||&&)", line):
            args = shlex.split(re.sub(r"\$\((\w+)\)", r"$\1", m.group(1)))
            out.append([a.removesuffix("[test]") for a in args if a != "-e"])
    return out


def _makefile_setup() -> tuple[list[str], dict[str, str]]:
    text = (REPO_ROOT / "Makefile").read_text()
    m = re.search(r"^\$\(VENV\)/\.installed:.*\n((?:\t.*\n)+)", text, re.M)
    assert m, "the Makefile's $(VENV)/.installed recipe is gone"
    variables = dict(re.findall(r"^(\w+) \?= (.*)$", text, re.M))
    return [ln.strip() for ln in m.group(1).splitlines()], variables


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_install_steps_match_the_makefile(name: str) -> None:
    recipe, make_vars = _makefile_setup()
    ins = _instructions(REPO_ROOT / name)
    runs = [arg for word, arg in ins if word == "RUN"]
    assert _pip_installs(runs) == _pip_installs(recipe)
    assert any("-m venv" in r for r in runs) and any("-m venv" in r for r in recipe)
    args = dict(arg.split("=", 1) for word, arg in ins if word == "ARG" and "=" in arg)
    assert args["TORCH_SPEC"] == make_vars["TORCH_SPEC"]
    # what the install needs is copied in, and .dockerignore does not drop it
    copied = " ".join(arg for word, arg in ins if word == "COPY")
    for needed in ("pyproject.toml", "README.md", "kvasir"):
        assert needed in copied
    dockerignore = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    ignored = [ln.strip() for ln in dockerignore if ln.strip() and not ln.startswith("#")]
    assert not {"kvasir", "pyproject.toml", "README.md"} & set(ignored)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_runs_kvasir_serve_as_non_root_with_healthcheck(name: str) -> None:
    ins = _instructions(REPO_ROOT / name)
    words = [w for w, _ in ins]
    assert words[0] in ("ARG", "FROM")
    users = [arg for w, arg in ins if w == "USER"]
    assert users and users[-1] not in ("root", "0")
    # USER comes after every RUN: nothing at run time has root
    assert max(i for i, w in enumerate(words) if w == "RUN") < words.index("USER")
    entry = json.loads(next(arg for w, arg in ins if w == "ENTRYPOINT"))
    assert entry[:2] == ["kvasir", "serve"]
    port = entry[entry.index("--port") + 1]
    assert [arg for w, arg in ins if w == "EXPOSE"] == [port]
    health = next(arg for w, arg in ins if w == "HEALTHCHECK")
    assert f"127.0.0.1:{port}/health" in health and "CMD" in health
    # `docker run IMAGE <args>` appends <args> to the entry point: the same flags as
    # `kvasir serve`, the model first
    ns = build_parser().parse_args(
        [*entry[1:], "Qwen/Qwen3-0.6B", "--max-model-len", "4096", "--api-key", "k"]
    )
    assert (ns.model_tag, ns.host, ns.port, ns.max_model_len) == (
        "Qwen/Qwen3-0.6B", "0.0.0.0", int(port), 4096,
    )  # fmt: skip
