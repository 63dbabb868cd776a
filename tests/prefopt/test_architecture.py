"""The shape of the code: no import cycle in ``prefopt/`` or ``losses/`` (imports inside functions included), no
library module importing a command-line module, only ``prefopt.build`` reading a composed config, and a loss with
a new input trains through the real trainer with nothing but the loss and one provider."""

import ast
import json
from pathlib import Path

import pytest
import torch

import losses
import prefopt
from losses.registry import _REGISTRY
from prefopt import providers as providers_module
from prefopt import reference as reference_module
from prefopt.config import ConfigError

from .test_trainer import TINY, metrics

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("prefopt", "losses")
CLI_MODULES = {"prefopt.train", "prefopt.select_rewards"}


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports, at module level or inside functions (``from pkg import name`` counts
    as importing ``pkg.name`` when that is a module, else ``pkg``). Importing ``a.b.c`` also runs the packages ``a.b``
    and ``a`` (their ``__init__``), so they count too, except the importing module's own parent packages."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            own_parents = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
            for target in targets:
                parts = target.split(".")
                chain = {".".join(parts[:i]) for i in range(1, len(parts) + 1)} - own_parents
                graph[name] |= {t for t in chain if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 40 and "prefopt.build" in graph["prefopt.trainer"]  # the graph is real
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_library_module_imports_a_command_line_module():
    graph = import_graph()
    offenders = {name: graph[name] & CLI_MODULES for name in graph if name not in CLI_MODULES}
    assert {name: deps for name, deps in offenders.items() if deps} == {}
    assert not any(dep.startswith("prefopt") for name in graph if name.startswith("losses") for dep in graph[name])


def test_only_build_and_the_command_line_read_a_hydra_config():
    """Composed configs (DictConfig) are read by prefopt.build; the modules below it take typed settings."""
    allowed = {
        "prefopt.build",
        "prefopt.config",
        "prefopt.train",
        "prefopt.select_rewards",
        "prefopt",
        "prefopt.compare",
        "prefopt.rewards",
    }  # compare reads saved config.yaml files; rewards accepts configs
    readers = set()
    for name, path in _modules().items():
        text = path.read_text()
        if "omegaconf" in text or "hydra" in text.replace("Hydra", ""):
            readers.add(name)
    assert readers <= allowed, readers - allowed


def test_docstrings_cite_no_document_outside_the_repository():
    for path in _modules().values():
        assert "spec §" not in path.read_text(), path


# --------------------------------------------------------------------------- a new input: the loss + one provider
@pytest.fixture
def toy_loss_and_provider():
    """A loss with an input no built-in provider supplies (``toy_weights``: one weight per pair) and the provider
    that supplies it, registered from the test and removed after."""

    @losses.register("toy_weighted", paper="a test", summary="-w·log σ(β(ΔS))")
    def toy_weighted(policy_chosen_logps, policy_rejected_logps, toy_weights, *, beta: float = 0.1):
        margin = beta * (policy_chosen_logps - policy_rejected_logps)
        per_example = -toy_weights * torch.nn.functional.logsigmoid(margin)
        return losses.LossOutput(per_example.mean(), per_example, {"toy/weight_mean": toy_weights.mean().detach()})

    calls = []

    class ToyWeights(providers_module.Provider):
        names = ("toy_weights",)

        def inputs(self, micro, own):
            calls.append((micro.step, micro.index, len(micro.items)))
            lengths = torch.tensor([len(p["chosen_ids"]) for p in micro.items], dtype=torch.float32)
            return {"toy_weights": (lengths / lengths.mean()).to(micro.device)}

    providers_module.register_provider("toy_weights", ToyWeights.names)(lambda ctx: ToyWeights())
    yield calls
    del _REGISTRY["toy_weighted"]
    del providers_module.PROVIDERS["toy_weights"]


def test_a_new_input_needs_only_the_loss_and_one_provider(tmp_path, toy_loss_and_provider):
    cfg = prefopt.compose([*TINY, f"cache_dir={tmp_path}/c", "trainer.max_steps=3", "trainer.micro_batch_size=4"])
    cfg.loss = {"name": "toy_weighted", "beta": 0.5}
    summary = prefopt.fit(cfg, run_dir=tmp_path / "run")
    lines = [line for line in metrics(summary) if "loss" in line]
    assert [line["step"] for line in lines] == [1, 2, 3]
    assert all(line["toy/weight_mean"] == pytest.approx(1.0) for line in lines)
    assert toy_loss_and_provider == [(s, m, 4) for s in range(3) for m in range(2)]  # every micro-batch, once
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["reference_model"] is False


def test_an_input_nobody_supplies_is_one_line_naming_it(tmp_path, toy_loss_and_provider):
    del providers_module.PROVIDERS["toy_weights"]
    providers_module.register_provider("toy_weights", ())(lambda ctx: None)  # registered, supplies nothing
    cfg = prefopt.compose([*TINY, f"cache_dir={tmp_path}/c", "trainer.max_steps=1"])
    cfg.loss = {"name": "toy_weighted"}
    with pytest.raises(ConfigError, match="loss 'toy_weighted' needs input\\(s\\) toy_weights, which no provider"):
        prefopt.fit(cfg, run_dir=tmp_path / "run")


# ------------------------------------------------------------------------------------------ one reference per run
@pytest.mark.parametrize(
    "overrides",
    [
        ["reference.mode=live", "trainer.sample_eval=true", "trainer.eval_every=2"],
        ["reference.mode=precomputed", "trainer.sample_eval=true", "trainer.eval_every=2"],
        ["trainer=online", "loss=rloo", "trainer.batch_size=4"],
        ["trainer=online", "loss=dpo", "trainer.batch_size=4", "trainer.online.eval_prompts=4"],
    ],
)
def test_training_sampling_and_evaluation_share_one_frozen_copy(tmp_path, monkeypatch, overrides):
    copies = []
    real = reference_module.frozen_copy
    monkeypatch.setattr(reference_module, "frozen_copy", lambda model: copies.append(1) or real(model))
    cfg = prefopt.compose([*TINY, f"cache_dir={tmp_path}/c", "trainer.max_steps=2", *overrides])
    prefopt.fit(cfg, run_dir=tmp_path / "run")
    assert copies == [1]
