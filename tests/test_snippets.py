"""Every example in the README and the docs runs: Python blocks, and the ``hf-babai`` commands of shell blocks.

Python blocks of one page run in order in one namespace (like a reader pasting them into one session), which starts
with ``tokenizer``/``tok`` (a byte tokenizer), ``model`` (a tiny random Llama), and ``x``, ``w``, ``in_features`` for
the solver's fragment. The small offline model's Hub id is replaced by a tiny random Llama of the same family, and
the Hub by a local HTTP one (its token's user ``tester`` belongs to the organisation ``me``), and an output folder
under ``/tmp/`` by one in the test's own folder; nothing else in a snippet is changed. A block
that is an excerpt of code tested elsewhere says so in the line above it (``<!-- snippet: excerpt WHY -->``).

Shell blocks: each ``hf-babai`` command runs through the real command line (in-process, exit code 0). Every other
command must be one of :data:`NOT_RUN` (a program this test cannot or need not start, with the reason), so a new
example can never go untested silently.
"""

from __future__ import annotations

import re
import shlex
import textwrap
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

from hf_babai.cli import main as cli
from integration_tests.local_hub import LocalHub

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
HUB_MODEL = "HuggingFaceTB/SmolLM2-135M"
TOKEN = "hf_local"  # the walkthrough's own token for its local Hub
#: Commands of shell blocks that are not run here, by their start, with why.
NOT_RUN = {
    "pip install": "installation: CI's set-up (scripts/setup.sh) installs the same way",
    "bash scripts/": "the project's set-up and test scripts: CI runs them",
    "PYTHON=.venv/bin/python bash scripts/gpu_check.sh": "the GPU check's CPU dry run: tests/test_gpu_check.py",
    ".venv/bin/hf-babai demo": "the README's main job, minutes on the real model; its quantize and perplexity code "
    "runs in the integration tests",
    ".venv/bin/python bench/": "benchmarks (minutes to hours); their logic has unit tests (tests/test_bench_paired.py)",
    ".venv/bin/python -m pytest": "the test suite itself",
    ".venv/bin/python -m integration_tests.architectures": "the architecture matrix (-m arch_matrix)",
    "vllm serve": "a GPU serving engine; integration_tests/test_serving_loaders.py runs vLLM's own loader code",
    "python -m sglang": "a GPU serving engine; integration_tests/test_serving_loaders.py runs SGLang's loader code",
    "python -m integration_tests.local_hub": "the offline Hub stand-in this test starts itself",
    "export HF_ENDPOINT": "environment for the local Hub, which this test sets itself",
    "HF_TOKEN=hf_wrong hf-babai publish": "a rejected token: tests/test_bad_inputs.py",
    "hf-babai-lm-eval": "lm-eval's own CLI: integration_tests/test_publish_eval.py runs it",
    "torchrun": "a launcher that starts processes: tests/test_distributed.py runs the same through --nproc",
}
MARK = re.compile(r"<!-- snippet: excerpt (\S.*) -->")


@dataclass
class Block:
    page: Path
    line: int
    lang: str
    code: str
    excerpt: str | None

    def __str__(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a page, with the excerpt mark of the line above each (if any)."""
    lines = page.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = re.match(r"^```(\w+)\s*$", lines[i])
        if not m:
            i += 1
            continue
        start = i
        i += 1
        body = []
        while lines[i] != "```":
            body.append(lines[i])
            i += 1
        above = next((ln for ln in reversed(lines[:start]) if ln.strip()), "")
        mark = MARK.search(above)
        out.append(Block(page, start + 1, m.group(1), "\n".join(body) + "\n", mark.group(1) if mark else None))
        i += 1
    return out


def commands(block: Block) -> list[str]:
    """The commands of a shell block: ``$`` lines of a console transcript, every line of a script; continuation
    lines joined, comments and a trailing ``&`` dropped, ``a && b`` split."""
    text = block.code.replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        if block.lang == "console":
            if not line.startswith("$ "):
                continue
            line = line[2:]
        line = re.sub(r"\s+#.*$", "", line).strip().rstrip("&").strip()
        if line and not line.startswith("#"):
            out += [c.strip() for c in line.split("&&")]
    return out


ALL = [b for page in PAGES for b in blocks(page)]
SHELL_LANGS = ("bash", "sh", "console")
PAGES_WITH_CODE = sorted({b.page for b in ALL if b.lang in (*SHELL_LANGS, "python") and not b.excerpt})
OFFLINE_MODEL = "~/.cache/hf_babai/smollm2-135m-hf"  # where scripts/setup.sh puts the small offline model


@pytest.fixture(scope="module")
def tiny_hub(tiny_env, tmp_path_factory):
    """The local Hub: the token's user is ``tester`` (the walkthrough's), member of the organisation ``me``."""
    server = LocalHub(tmp_path_factory.mktemp("hub"), token=TOKEN, user="tester", orgs=("me",)).start()
    yield server
    server.stop()


@pytest.fixture
def sandbox(tiny_env, tiny_hub, tmp_path, monkeypatch):
    """The working folder and environment a reader would have: offline model → tiny model, Hub → local Hub."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HOME", str(tmp_path / ".hf_home"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    consts = huggingface_hub.constants
    monkeypatch.setattr(consts, "ENDPOINT", tiny_hub.url)
    monkeypatch.setattr(
        consts, "HUGGINGFACE_CO_URL_TEMPLATE", tiny_hub.url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(consts, "HF_HUB_CACHE", str(tmp_path / ".hf_home" / "hub"))
    monkeypatch.setattr(consts, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(consts, "HF_HUB_DISABLE_XET", True)
    return tiny_env


def _localize(code: str, env: dict) -> str:
    """The small offline model as a model path (its Hub id after ``from_pretrained(``, ``path = `` or
    ``quantize``, or its install folder) becomes the tiny model; a card's ``base_model`` stays the Hub id."""
    tiny = str(env["src"])
    code = code.replace(f'from_pretrained("{HUB_MODEL}"', f"from_pretrained({tiny!r}")
    code = code.replace(f'path = "{HUB_MODEL}"', f"path = {tiny!r}")
    return code.replace(f"quantize {HUB_MODEL} ", f"quantize {tiny} ").replace(OFFLINE_MODEL, tiny)


def test_every_code_block_is_run_or_marked():
    """The parser finds the blocks this test runs (a page whose fences it missed would pass vacuously)."""
    assert len([b for b in ALL if b.lang == "python"]) >= 9
    assert any("hf-babai quantize" in b.code for b in ALL if b.lang in SHELL_LANGS)
    for b in ALL:
        assert b.lang in ("python", "bash", "sh", "console", "text", "yaml", "json", "jinja", "toml"), b


def _run_shell(block: Block, env: dict, capsys, monkeypatch) -> None:
    for cmd in commands(block):
        if any(cmd.startswith(start) for start in NOT_RUN):
            continue
        argv = shlex.split(_localize(re.sub(r"(?<=\s)/tmp/", "tmp/", cmd), env))  # /tmp/x: a sandbox folder
        while argv and re.match(r"^[A-Z_]+=", argv[0]):  # VAR=value before the command
            name, _, value = argv.pop(0).partition("=")
            monkeypatch.setenv(name, value)
        assert argv and argv[0] in ("hf-babai", ".venv/bin/hf-babai"), (
            f"{block}: `{cmd}` is neither an hf-babai command nor listed in NOT_RUN with a reason"
        )
        code = cli(argv[1:])
        errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith(("error", "interrupted"))]
        assert code == 0, f"{block}: `{cmd}` exited {code}: {errors}"


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=[str(p.relative_to(ROOT)) for p in PAGES_WITH_CODE])
def test_page_examples_run(page: Path, sandbox, capsys, monkeypatch):
    """A page's examples in order, in one folder and one Python namespace, as a reader following it would."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    env = sandbox
    tok = AutoTokenizer.from_pretrained(env["src"])
    g = torch.Generator().manual_seed(0)
    namespace = {
        "tokenizer": tok,
        "tok": tok,
        "model": AutoModelForCausalLM.from_pretrained(env["src"], dtype=torch.float32).eval(),
        "in_features": 64,
        "x": torch.randn(256, 64, generator=g),
        "w": torch.randn(32, 64, generator=g),
    }
    for block in blocks(page):
        if block.excerpt:
            continue
        if block.lang in SHELL_LANGS:
            _run_shell(block, env, capsys, monkeypatch)
        elif block.lang == "python":
            code = _localize(textwrap.dedent(block.code), env)
            try:
                exec(compile(code, str(block), "exec"), namespace)
            except Exception as e:
                raise AssertionError(f"the example at {block} fails: {type(e).__name__}: {e}") from e


#: Options the CLI pages name that belong to other programs, or stand for a pattern.
OTHER_OPTIONS = {"--quantization", "--model-path", "--flag", "--no-flag", "--strict", "--include"}


@pytest.mark.parametrize("page", ["README.md", "docs/cli.md"])
def test_options_the_cli_pages_name_exist(page: str):
    """Every ``--option`` the command-line pages mention is one that ``hf-babai`` (some subcommand) accepts."""
    from hf_babai.cli import build_parser

    parser = build_parser()
    known = set()
    for action in parser._subparsers._group_actions[0].choices.values():  # each subcommand's parser
        for a in action._actions:
            known.update(a.option_strings)
    mentioned = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", (ROOT / page).read_text()))
    assert mentioned, page
    assert mentioned - known - OTHER_OPTIONS == set(), f"{page} names options hf-babai does not have"
