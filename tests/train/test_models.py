"""The default models of `mtlkit compare`: one per kind of data, every head the right shape."""

from __future__ import annotations

import pytest
import torch

from mtlkit.tasks import Task
from mtlkit.train.models import default_model


def test_dense_tasks_get_full_resolution_predictions_and_train() -> None:
    tasks = [Task.segmentation("seg", 13), Task.depth("depth"), Task.normals("normal")]
    model = default_model((3, 12, 20), tasks)
    x = torch.randn(2, 3, 12, 20)
    out = model(x)
    assert {t: tuple(y.shape) for t, y in out.items()} == {
        "seg": (2, 13, 12, 20), "depth": (2, 1, 12, 20), "normal": (2, 3, 12, 20)}
    assert model.features.shape[1] == 512  # dilated ResNet-18, output stride 8
    sum(y.square().mean() for y in out.values()).backward()
    assert all(p.grad is not None for p in model.shared_parameters())


def test_vector_and_image_inputs() -> None:
    tasks = [Task.classification("a", 10), Task.regression("b", dim=3)]
    out = default_model((1, 12, 12), tasks)(torch.zeros(2, 1, 12, 12))
    assert tuple(out["a"].shape) == (2, 10) and tuple(out["b"].shape) == (2, 3)
    out = default_model((250,), tasks)(torch.zeros(2, 250))
    assert tuple(out["a"].shape) == (2, 10)


def test_mixed_dense_and_vector_tasks_or_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="dense tasks only"):
        default_model((3, 8, 8), [Task.depth("d"), Task.classification("c", 2)])
    with pytest.raises(ValueError, match="no default model for inputs of shape"):
        default_model((2, 3), [Task.regression("r")])


def test_model_registry_builds_by_name_and_by_module_path():
    from mtlkit.train.models import available_models, build_model

    tasks = [Task.classification("c", 3), Task.regression("r")]
    assert "default" in available_models()
    by_name = build_model("default", tasks, (5,))
    by_path = build_model("mtlkit.train.models:_default", tasks, (5,))
    assert type(by_name) is type(by_path)
    assert tuple(by_path(torch.zeros(2, 5))["c"].shape) == (2, 3)
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        build_model("nope", tasks, (5,))
    with pytest.raises(ValueError, match="cannot import 'missing'"):
        build_model("mtlkit.train.models:missing", tasks, (5,))
