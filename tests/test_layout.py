"""The package layout holds: dependencies flow one way (dashboard -> chat -> finetune -> core),
no module imports another that imports it back (directly or around a loop), and every idea the
README's Layout section names has one home. Read from the source with `ast`, not by importing."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("core", "finetune", "chat", "dashboard")
LAYER = {name: i for i, name in enumerate(PACKAGES)}  # a package may import lower layers only


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {
        module_name(p): p
        for package in PACKAGES
        for p in (ROOT / package).rglob("*.py")
        if "pretrained" not in p.parts
    }


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules imported anywhere in the file (also inside functions: a deferred import
    is still a dependency)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {m: imports_of(p, modules) - {m} for m, p in modules.items()}


def test_dependencies_flow_one_way(graph):
    wrong = [
        f"{m} imports {dep}"
        for m, deps in graph.items()
        for dep in deps
        if LAYER[dep.split(".")[0]] > LAYER[m.split(".")[0]]
    ]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles(graph):
    """Tarjan's strongly connected components: any component of two or more modules is a
    cycle. (A package's __init__ importing its own submodules is not counted.)"""
    edges = {
        m: {d for d in deps if not (m + ".").startswith(d + ".") and not d.startswith(m + ".")}
        for m, deps in graph.items()
    }
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_stages_do_not_import_each_other_for_helpers(graph):
    """A training stage gets shared helpers from the library (core.train.trainer, core.train.data,
    core.lm.chat_format, core.train.losses, core.lm.generate), not from another stage. The allowed uses are
    the ones that compose stages: rlhf runs ppo/dpo, ppo and rollouts score with the reward
    model, the pipeline and the feedback store run stages."""
    allowed = {
        "core.train.stages.rlhf": {"core.train.stages.ppo", "core.train.stages.dpo", "core.train.stages.reward",
                             "core.train.stages.rollouts"},
        "core.train.stages.ppo": {"core.train.stages.rollouts"},
        "core.train.stages.rollouts": {"core.train.stages.reward"},
        "core.train.stages.pipeline": {"core.train.stages.pretrain", "core.train.stages.sft", "core.train.stages.reward",
                                 "core.train.stages.rlhf", "core.train.stages.rollouts"},
        "core.train.stages.feedback": {"core.train.stages.reward", "core.train.stages.rlhf"},
    }  # fmt: skip
    wrong = [
        f"{m} imports {d}"
        for m, deps in graph.items()
        if m.startswith("core.train.stages.")
        for d in deps
        if d.startswith("core.train.stages.")
        and d != "core.train.stages"
        and d not in allowed.get(m, set())
    ]
    assert not wrong, "\n".join(wrong)
    library = [m for m in graph if m.startswith("core.") and not m.startswith("core.train.stages")]
    leaks = [
        f"{m} imports {d}"
        for m in library
        for d in graph[m]
        if d.startswith("core.train.stages") and not m.startswith("core.commands")
    ]
    assert not leaks, "the library must not depend on a stage:\n" + "\n".join(leaks)


def test_one_definition_per_idea():
    """The ideas that used to be written several times are defined once each."""
    ideas = {
        "def decode": "core/lm/generate.py",  # the decoding loop
        "def resolve": "core/lm/loader.py",  # the model resolver
        "def encode_prompt": "core/lm/chat_format.py",  # prompt -> ids
        "def stop_ids": "core/lm/chat_format.py",  # where an answer ends
        "def load_spec": "finetune/inference.py",  # the adapter loader
        "def fit": "core/train/trainer.py",  # the training loop
        "def lm_loss": "core/train/losses.py",  # next-token cross-entropy
        "class ModelSpecError": "core/lm/loader.py",
    }
    sources = {
        str(p.relative_to(ROOT)): p.read_text(encoding="utf-8")
        for package in PACKAGES
        for p in (ROOT / package).rglob("*.py")
    }
    for needle, home in ideas.items():
        where = [f for f, text in sources.items() if f"\n{needle}(" in text or
                 f"\n{needle}:" in text]  # fmt: skip
        assert where == [home], f"{needle}: defined in {where}, expected only {home}"
    cross_entropy = [f for f, text in sources.items() if "F.cross_entropy(" in text]
    assert cross_entropy == ["core/train/losses.py"], cross_entropy


def defined_names(path: Path) -> set[str]:
    """Names a module defines at its top level (functions, classes, assignments, imports)."""
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
            if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
                names.update(ast.literal_eval(node.value))  # served lazily (core/__init__.py)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def test_every_project_import_names_something_that_exists():
    """Also the imports inside functions, which importing a module does not run: a moved
    function must not leave a deferred import pointing at its old home."""
    modules = project_modules()
    tests = {module_name(p): p for p in (ROOT / "tests").glob("*.py")}
    broken = []
    for source in [*modules.values(), *tests.values()]:
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.ImportFrom) and node.module and node.level == 0):
                continue
            if node.module.split(".")[0] not in PACKAGES:
                continue
            if node.module not in modules:
                broken.append(f"{source.name}: no module {node.module}")
                continue
            defined = defined_names(modules[node.module])
            for alias in node.names:
                if alias.name not in defined and f"{node.module}.{alias.name}" not in modules:
                    broken.append(f"{source.name}: {node.module} has no {alias.name}")
    assert not broken, "\n".join(broken)


def python_sources(*packages: str) -> dict[str, str]:
    return {
        str(p.relative_to(ROOT)): p.read_text(encoding="utf-8")
        for package in packages
        for p in (ROOT / package).rglob("*.py")
        if "pretrained" not in p.parts
    }


def test_the_engines_are_the_only_other_forward_implementation():
    """core/lm/model.py defines the forward pass; an engine may run it another way (the 4-bit
    step), and nothing else re-implements attention, rotary embeddings or the norm. fast.py
    swaps layers (subclasses of model.py's), so it defines none of these."""
    forward_parts = ("scaled_dot_product_attention(", "def apply_rotary(", "def rotate_half(",
                     "F.silu(", "class RMSNorm(", "def rms_norm(")  # fmt: skip
    found = sorted(
        {
            f
            for f, text in python_sources(*PACKAGES).items()
            for part in forward_parts
            if part in text
        }
    )
    assert found == ["core/lm/engines/int4.py", "core/lm/model.py"], found
    model = ast.parse((ROOT / "core/lm/model.py").read_text(encoding="utf-8"))
    used = {n.attr for n in ast.walk(model) if isinstance(n, ast.Attribute)}
    speed = used & {"is_inference_mode_enabled", "get_num_threads", "bmm", "rms_norm", "float16"}
    assert not speed, f"core/lm/model.py has speed code again: {sorted(speed)}"


LOOSE_SAMPLING = {"temperature", "top_k", "top_p", "seed", "repetition_penalty", "max_new_tokens"}
DECODING_ENTRY_POINTS = {"decode", "stream_logits", "stream_tokens", "stream_steps", "generate",
                         "answer", "sample_batch", "stream_generate"}  # fmt: skip


def test_sampling_settings_cross_layers_only_as_sampling_params():
    """The decoding loop's entry points (core.lm.generate, finetune.inference) take one
    SamplingParams, never loose temperature/top_k/top_p/seed/penalty/length arguments, and no
    caller anywhere (tests included) passes those loose."""
    loose_defs, loose_calls = [], []
    for path in ("core/lm/generate.py", "finetune/inference.py"):
        for node in ast.walk(ast.parse((ROOT / path).read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef) and node.name in DECODING_ENTRY_POINTS:
                names = {a.arg for a in node.args.args + node.args.kwonlyargs}
                if names & (LOOSE_SAMPLING - {"max_new_tokens"}):
                    loose_defs.append(f"{path}: {node.name}{sorted(names & LOOSE_SAMPLING)}")
    sources = python_sources(*PACKAGES, "tests")
    for path, text in sources.items():
        for node in ast.walk(ast.parse(text)):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id in DECODING_ENTRY_POINTS):  # fmt: skip
                loose = {k.arg for k in node.keywords} & LOOSE_SAMPLING
                if loose and node.func.id != "sample_batch":
                    loose_calls.append(f"{path}:{node.lineno} {node.func.id}({sorted(loose)})")
    assert not loose_defs, loose_defs
    assert not loose_calls, loose_calls
