"""Every registered backbone, parametrized over the registry; resnet12, wrn28_10 and torchvision:*.

Kept light for a busy 2-core machine: batch 2, each (backbone, channels, size) built once per module.
"""
from __future__ import annotations

from importlib import metadata

import pytest
import torch
from torch import nn

import metabench_plugins.backbones.resnet12
import metabench_plugins.backbones.torchvision_backbones
import metabench_plugins.backbones.wrn
from metabench import MetabenchError
from metabench.plugins import ENTRY_POINT_GROUP, PluginHost, PluginSource, discover

BATCH = 2
# The plugins of this file, added to the installed ones until their entry points exist.
OURS = {"resnet12": metabench_plugins.backbones.resnet12, "wrn": metabench_plugins.backbones.wrn,
        "torchvision": metabench_plugins.backbones.torchvision_backbones}
# What a family entry "family:*" is tested as.
FAMILY_EXAMPLES = {"torchvision:*": "torchvision:resnet18"}
# Published sizes: MetaOptNet's ResNet-12 has ~12.4M parameters, WRN-28-10 ~36.5M (CIFAR, with its classifier).
PARAMETERS = {"resnet12": 12_424_320, "wrn28_10": 36_472_784}


def _host() -> PluginHost:
    installed = {ep.value for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}
    sources = discover()
    taken = {s.name for s in sources}
    sources += [PluginSource.from_object(name if name not in taken else f"{name}-test", module, "tests", "0")
                for name, module in OURS.items() if module.__name__ not in installed]
    return PluginHost(sources)


HOST = _host()
NAMES = [FAMILY_EXAMPLES.get(n, n) for n in HOST.backbones.names()]


@pytest.fixture(scope="module")
def build():
    """build(name, in_channels, image_size, **options) -> Backbone, built once per module; seeded."""
    cache: dict = {}

    def get(name: str, in_channels: int, image_size: int, **options):
        key = (name, in_channels, image_size, tuple(sorted(options.items())))
        if key not in cache:
            if name.endswith(":*"):
                pytest.skip(f"no example variant for backbone family {name!r}")
            torch.manual_seed(0)
            try:
                cache[key] = HOST.build_backbone(name, in_channels, image_size, **options)
            except MetabenchError as exc:
                cache[key] = exc
        if isinstance(cache[key], MetabenchError):
            if " px" in str(cache[key]) or "image_size" in str(cache[key]):
                pytest.skip(f"{name} does not support {image_size} px: {cache[key]}")
            raise cache[key]
        return cache[key]

    return get


def images(in_channels: int, image_size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(BATCH, in_channels, image_size, image_size, generator=torch.Generator().manual_seed(seed))


def test_host_registers_the_backbones_without_errors():
    ours = set(OURS) | {f"{name}-test" for name in OURS}  # (other plugins' errors are test_plugins' business)
    assert [e for e in HOST.errors if any(f"plugin {name!r}" in e for name in ours)] == []
    assert {"conv4", "resnet12", "wrn28_10", "torchvision:*"} <= set(HOST.backbones.names())
    for entry in HOST.backbones:  # `metabench list backbones` shows the first docstring line
        assert (entry.obj.__doc__ or "").strip(), entry.name


@pytest.mark.parametrize("name", NAMES)
def test_gray_28px_shape_and_gradients(name, build):
    backbone = build(name, 1, 28)
    module = backbone.module
    assert module.training  # factories hand over a module in training mode
    x = images(1, 28).requires_grad_()
    out = module(x)
    assert out.shape == (BATCH, backbone.out_features)
    out.square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # the gradient reaches the input
    for pname, p in module.named_parameters():
        assert p.grad is not None, f"{name}: no gradient for {pname}"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient for {pname}"
    module.zero_grad(set_to_none=True)
    count = sum(p.numel() for p in module.parameters())
    assert 1_000 < count < 200_000_000


@pytest.mark.parametrize("name", NAMES)
def test_rgb_84px_shape(name, build):
    backbone = build(name, 3, 84)
    module = backbone.module
    module.eval()
    try:
        with torch.no_grad():
            out = module(images(3, 84))
    finally:
        module.train()
    assert out.shape == (BATCH, backbone.out_features)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name, expected", sorted(PARAMETERS.items()))
def test_published_parameter_counts(name, expected, build):
    rgb = build(name, 3, 84).module
    assert sum(p.numel() for p in rgb.parameters()) == expected
    # grey input: the convolutions reading the image (stem, and resnet12's first shortcut) lose 2/3
    reading = sum(m.weight.numel() for m in rgb.modules() if isinstance(m, nn.Conv2d) and m.in_channels == 3)
    assert sum(p.numel() for p in build(name, 1, 28).module.parameters()) == expected - reading * 2 // 3


def test_resnet12_options(build):
    assert build("resnet12", 3, 84).out_features == 640
    flat = build("resnet12", 3, 84, pool=False)  # MetaOptNet's miniImageNet network: 5 x 5 x 640
    assert flat.out_features == 16000
    assert sum(p.numel() for p in flat.module.parameters()) == PARAMETERS["resnet12"]
    flat.module.eval()
    with torch.no_grad():
        assert flat.module(images(3, 84)).shape == (BATCH, 16000)
    flat.module.train()
    half = HOST.build_backbone("resnet12", 1, 28, width_scale=0.5, dropout=0.1)
    assert half.out_features == 320
    assert any(isinstance(m, nn.Dropout) and m.p == 0.1 for m in half.module.modules())
    assert half.module(images(1, 28)).shape == (BATCH, 320)
    for options, message in (({"dropout": 1.0}, "dropout must be in"), ({"width_scale": 0}, "width_scale"),
                             ({"pool": "yes"}, "pool must be"), ({"widths": [1]}, "has no option 'widths'")):
        with pytest.raises(MetabenchError, match=message):
            HOST.build_backbone("resnet12", 1, 28, **options)
    with pytest.raises(MetabenchError, match="at least 16 px"):
        HOST.build_backbone("resnet12", 1, 15)


def test_wrn28_10_options():
    with pytest.raises(MetabenchError, match=r"dropout must be a number in \[0, 1\)"):
        HOST.build_backbone("wrn28_10", 3, 32, dropout=-0.1)
    with pytest.raises(MetabenchError, match="in_channels must be a positive integer"):
        HOST.build_backbone("wrn28_10", 0, 32)
    wrn = HOST.build_backbone("wrn28_10", 3, 8, dropout=0.3)  # any size: 8 -> 8 -> 4 -> 2
    assert sum(isinstance(m, nn.Dropout) and m.p == 0.3 for m in wrn.module.modules()) == 12  # one per block
    assert wrn.module(images(3, 8)).shape == (BATCH, 640)


@pytest.mark.parametrize("variant, features", [("resnet18", 512), ("mobilenet_v3_small", 1024)])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_torchvision_models_with_1_and_3_channels(variant, features, in_channels, build):
    backbone = build(f"torchvision:{variant}", in_channels, 28)
    assert backbone.out_features == features
    module = backbone.module
    assert module.training
    stem = next(m for m in module.modules() if isinstance(m, nn.Conv2d))
    assert stem.in_channels == in_channels
    assert not any(isinstance(m, nn.Linear) and m.out_features in (1000, 1009) for m in module.modules())
    x = images(in_channels, 28).requires_grad_()
    out = module(x)
    assert out.shape == (BATCH, features)
    out.square().mean().backward()
    assert x.grad.abs().sum() > 0 and stem.weight.grad.abs().sum() > 0
    module.zero_grad(set_to_none=True)


def test_torchvision_gray_stem_equals_rgb_network_on_gray_copied_to_rgb():
    nets = []
    for in_channels in (1, 3):  # fresh ones: the cached ones' BatchNorm statistics have moved
        torch.manual_seed(0)
        nets.append(HOST.build_backbone("torchvision:resnet18", in_channels, 28).module.eval())
    x = images(1, 28)
    with torch.no_grad():
        torch.testing.assert_close(nets[0](x), nets[1](x.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-5)


def test_torchvision_errors_are_one_line_user_errors():
    with pytest.raises(MetabenchError, match=r"unknown torchvision classification model 'resnett18'; "
                                             r"did you mean torchvision:resnet18"):
        HOST.build_backbone("torchvision:resnett18", 1, 28)
    with pytest.raises(MetabenchError, match="did you mean torchvision:vit_"):
        HOST.build_backbone("torchvision:vit", 3, 224)
    with pytest.raises(MetabenchError, match="unknown torchvision classification model 'fasterrcnn"):  # detection models are not backbones
        HOST.build_backbone("torchvision:fasterrcnn_resnet50_fpn", 3, 224)
    with pytest.raises(MetabenchError, match="has no option 'dropout'; accepted: none"):
        HOST.build_backbone("torchvision:resnet18", 3, 28, dropout=0.1)
    with pytest.raises(MetabenchError, match="multiple of its patch size 32, got 84 px"):
        HOST.build_backbone("torchvision:vit_b_32", 3, 84)
    with pytest.raises(MetabenchError, match=r"squeezenet1_1 does not work on 16 px images; use at least 17 px") as info:
        HOST.build_backbone("torchvision:squeezenet1_1", 1, 16)
    assert "\n" not in str(info.value)
