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


# every registered model, on each kind of input it serves: the outputs have the task's shape,
# the shared / task partition covers every parameter once, and one backward reaches them all
KINDS = {
    "flat": ([Task.classification("a", 3), Task.regression("b", dim=2)], (6,)),
    "image": ([Task.classification("a", 3), Task.regression("b", dim=2)], (1, 12, 12)),
    "dense": ([Task.segmentation("seg", 5), Task.depth("depth")], (3, 32, 32)),
}
SERVES = {
    "default": ("flat", "image", "dense"), "hard_sharing": ("flat", "image", "dense"),
    "cross_stitch": ("flat", "image", "dense"), "mtan": ("image", "dense"),
    "segnet_mtan": ("dense",), "resnet18_deeplab": ("dense",), "resnet50_deeplab": ("dense",),
    "mmoe": ("flat",), "cgc": ("flat",), "ple": ("flat",), "dselect_k": ("flat",),
    "celeba_cnn": ("image",),
    "mrn": (),  # MRN's tensor prior needs equal output sizes: tested on its own below
    "pad_net": ("dense",), "mti_net": ("dense",), "nddr": ("dense",),
}
TINY_HRNET = {"width": 4, "modules": (1, 1, 1), "blocks": 1, "stem_blocks": 1}
SMALL = {"segnet_mtan": {"filters": (4, 8, 8, 16, 16)},
         "pad_net": {"hrnet": TINY_HRNET, "channels": 4}, "mti_net": {"hrnet": TINY_HRNET},
         "nddr": {"resnet": "resnet18", "layers": (1, 1, 1, 1), "head_channels": 8}}


def test_every_registered_model_is_listed_here():
    from mtlkit.train.models import available_models, model_builder

    # the benchmark protocols' models read their own inputs (tabular codes, packed molecules):
    # tests/train/test_benchmark_protocols.py trains each on its data
    names = {n for n in available_models()
             if model_builder(n).__module__ != "mtlkit.train.protocol_models"}
    assert names == set(SERVES)


@pytest.mark.parametrize(("name", "kind"), [(n, k) for n, ks in SERVES.items() for k in KINDS
                                            if k in ks or n != "mrn"])
def test_registered_model_builds_and_trains_or_names_what_it_serves(name, kind):
    from mtlkit.train.models import build_model

    tasks, shape = KINDS[kind]
    if kind not in SERVES[name]:
        with pytest.raises(ValueError, match=rf"model '{name}' serves .* inputs, not {kind}"):
            build_model(name, tasks, shape, **SMALL.get(name, {}))
        return
    torch.manual_seed(0)
    model = build_model(name, tasks, shape, **SMALL.get(name, {}))
    x = torch.randn(2, *shape)
    out = model(x)
    want = {"a": (2, 3), "b": (2, 2), "seg": (2, 5, 32, 32), "depth": (2, 1, 32, 32)}
    assert {t: tuple(y.shape) for t, y in out.items()} == {t.name: want[t.name] for t in tasks}
    owned = [p for t in tasks for p in model.task_parameters(t.name)]
    shared = list(model.shared_parameters())
    assert len({id(p) for p in owned + shared}) == len(owned) + len(shared) \
        == len(list(model.parameters()))
    sum(y.float().square().mean() for y in out.values()).backward()
    assert all(p.grad is not None for p in shared)


def test_mrn_on_tasks_of_equal_output_size():
    from mtlkit.train.models import build_model

    tasks = [Task.regression("a"), Task.regression("b")]
    out = build_model("mrn", tasks, (6,))(torch.randn(4, 6))
    assert {t: tuple(y.shape) for t, y in out.items()} == {"a": (4, 1), "b": (4, 1)}
    with pytest.raises(ValueError, match="multiples of 32"):
        build_model("segnet_mtan", KINDS["dense"][0], (3, 24, 24))


@pytest.mark.parametrize("init", [[0.8], [0.8, 0.1, 0.1], "0.8", [0.8, float("nan")], ["a", 1]])
def test_cross_stitch_and_nddr_init_must_be_a_pair_of_numbers(init):
    from mtlkit.train.models import build_model

    tasks = [Task.regression("a"), Task.regression("b")]
    for name, shape in (("cross_stitch", (4,)), ("nddr", (3, 8, 8))):
        dense = [Task.segmentation("a", 2), Task.segmentation("b", 2)]
        with pytest.raises(ValueError, match=r"^model_options\.init must be"):
            build_model(name, tasks if name == "cross_stitch" else dense, shape, init=init)
