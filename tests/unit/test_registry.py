"""The model registry: built-in models by name, one instance per registry, device selection."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import inference
from inference import PermanentError
from inference.model import Model
from inference.models.ct_tissue import CtTissueModel
from inference.models.foreground import ForegroundModel
from inference.models.lung_nodules import LungNoduleModel
from inference.registry import ModelRegistry, builtin_factories, select_device

CPU = torch.device("cpu")


def test_builtin_factories_name_the_builtin_models() -> None:
    """The built-ins are ct-tissue and foreground, keyed by the models' own names."""
    factories = builtin_factories()
    assert factories == {"ct-tissue": CtTissueModel, "foreground": ForegroundModel,
                         "ct-lung-nodules": LungNoduleModel}
    for name, factory in factories.items():
        model = factory(CPU)
        assert isinstance(model, Model)
        assert model.name == name
        assert model.version == "1.0.0"
        assert model.labels, name


def test_get_creates_each_model_once_on_the_registry_device() -> None:
    """get() builds a model once, on the registry's device, then returns the same one."""
    registry = ModelRegistry(CPU)
    assert registry.names == ["ct-lung-nodules", "ct-tissue", "foreground"]
    first = registry.get("ct-tissue")
    assert isinstance(first, CtTissueModel)
    assert first.device == CPU
    assert registry.get("ct-tissue") is first
    assert registry.get("foreground") is not first


def test_unknown_model_is_a_permanent_error() -> None:
    """Asking for a model nobody registered names the model and the known ones."""
    with pytest.raises(
        PermanentError, match=r"unknown model 'nope'; known models: ct-lung-nodules, ct-tissue, foreground"
    ):
        ModelRegistry(CPU).get("nope")
    with pytest.raises(PermanentError, match="known models: none"):
        ModelRegistry(CPU, factories={}).get("ct-tissue")


def test_register_adds_a_factory() -> None:
    """A registered factory is called with the registry's device."""
    seen: list[torch.device] = []

    def factory(device: torch.device) -> Model:
        seen.append(device)
        return ForegroundModel(device)

    registry = ModelRegistry(CPU, factories={})
    registry.register("my-model", factory)
    assert registry.names == ["my-model"]
    assert isinstance(registry.get("my-model"), ForegroundModel)
    registry.get("my-model")
    assert seen == [CPU]


def test_select_device() -> None:
    """'auto' is CUDA exactly when torch sees a GPU; other names pass through."""
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert select_device().type == expected
    assert select_device("cpu") == CPU
    assert select_device("cuda:1") == torch.device("cuda", 1)


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else "?"


def test_only_select_device_calls_torch_cuda() -> None:
    """Nothing in the inference package but select_device and ``inference/gpu.py`` (device
    choice, autocast, peak memory, freeing the cache) calls torch.cuda or .cuda()."""
    root = Path(inference.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        if path == root / "gpu.py":
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        allowed: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name == "select_device":
                allowed |= {n.lineno for n in ast.walk(node) if hasattr(n, "lineno")}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or node.lineno in allowed:
                continue
            # Naming torch.cuda.OutOfMemoryError to catch it is fine; calling into CUDA is not.
            name = _dotted(node.func)
            if name.startswith("torch.cuda.") or name.endswith(".cuda"):
                offenders.append(f"{path.relative_to(root)}:{node.lineno} {name}()")
    assert offenders == []


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA: torch.cuda.is_available() is false"
)
def test_models_are_built_on_cuda() -> None:
    """With a GPU, 'auto' gives CUDA and the registry builds its models there."""
    registry = ModelRegistry(select_device("auto"))
    model = registry.get("ct-tissue")
    assert isinstance(model, CtTissueModel)
    assert model.device.type == "cuda"
