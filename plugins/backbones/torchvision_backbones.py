"""The ``torchvision:*`` backbone family: any torchvision classification model as a feature extractor.

``--backbone torchvision:resnet18`` builds ``torchvision.models.get_model("resnet18",
weights=None)``, randomly initialised (metabench never downloads weights), and makes it a
backbone:

* The classifier goes: the last layer producing the class scores (a Linear, or SqueezeNet's
  1x1 convolution) becomes ``nn.Identity``, and so does a Dropout registered right before it
  in the same parent (the classifier's own dropout). Layers before it stay, so the features are
  what the classifier read: ResNet 512 (resnet18), MobileNetV3 its 1024/1280 hidden layer,
  VGG and AlexNet their 4096-wide fc7.
* With ``in_channels`` other than 3, the stem convolution (the first Conv2d taking 3 channels)
  is replaced by one of the same shape taking ``in_channels``. For 1 channel its weights are
  the sum of the RGB weights, so the network computes exactly what the random RGB network
  computes on the grey image copied into three channels; for other counts they are drawn
  normally with the variance that keeps each output's variance as at initialisation.
* ``image_size`` is given to the models that are built for one size (ViT: ``image_size``, a
  multiple of the patch size; MaxViT: ``input_size``), and the feature size is measured by one
  forward pass of a zero image in eval mode. A size the model cannot take is a clear error.
  GoogLeNet and Inception v3 are built without their auxiliary classifiers.
"""
from __future__ import annotations

import difflib

import torch
import torchvision
from torch import nn

from metabench import Backbone, hookimpl

FAMILY = "torchvision"
SENTINEL_CLASSES = 1009  # an unusual class count, so the classifier is the layer producing exactly it
BUILD_OPTIONS = {
    "googlenet": {"aux_logits": False, "transform_input": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "transform_input": False, "init_weights": True},
}
SIZE_ERRORS = (RuntimeError, ValueError, AssertionError, IndexError, ZeroDivisionError)


def classification_models() -> list[str]:
    """Names of torchvision's classification models (not detection, segmentation, video, ...)."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def _check_variant(variant) -> str:
    names = classification_models()
    if variant in names:
        return variant
    text = str(variant)
    close = difflib.get_close_matches(text.lower(), names, n=3, cutoff=0.5)
    if not close:  # e.g. 'resnet' or 'vit': names starting with it
        close = [n for n in names if n.startswith(text.lower()[:4])][:3]
    hint = f"; did you mean {' or '.join(f'{FAMILY}:{c}' for c in close)}?" if close else ""
    raise ValueError(f"unknown torchvision classification model {text!r}{hint} "
                     f"({len(names)} available, e.g. {', '.join(names[:3])}, ...; "
                     f"see torchvision.models.list_models(module=torchvision.models))")


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _build_options(variant: str, image_size: int) -> dict:
    options = {"weights": None, "num_classes": SENTINEL_CLASSES, **BUILD_OPTIONS.get(variant, {})}
    if variant.startswith("vit_"):
        options["image_size"] = image_size
    elif variant.startswith("maxvit_"):
        options["input_size"] = (image_size, image_size)
    return options


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def remove_classifier(model: nn.Module, classes: int) -> str:
    """Replace the layer producing ``classes`` scores (and its dropout) by nn.Identity; its name."""
    found = [n for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and m.out_features == classes
             or isinstance(m, nn.Conv2d) and m.out_channels == classes]
    if not found:
        raise ValueError(f"found no layer producing the {classes} class scores")
    name = found[-1]
    parent_name, _, child = name.rpartition(".")
    siblings = list(model.get_submodule(parent_name).named_children())
    position = [n for n, _ in siblings].index(child)
    if position > 0 and isinstance(siblings[position - 1][1], nn.Dropout):
        _replace(model, f"{parent_name}.{siblings[position - 1][0]}".lstrip("."), nn.Identity())
    _replace(model, name, nn.Identity())
    return name


def adapt_stem(model: nn.Module, in_channels: int) -> str:
    """Make the first convolution taking 3 channels take ``in_channels``; its name."""
    stem = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.in_channels == 3), None)
    if stem is None:
        raise ValueError(f"found no 3-channel input convolution to adapt to {in_channels} channels")
    name, old = stem
    if old.groups != 1:
        raise ValueError(f"its input convolution {name!r} is grouped; cannot adapt it to {in_channels} channels")
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, stride=old.stride, padding=old.padding,
                    dilation=old.dilation, bias=old.bias is not None, padding_mode=old.padding_mode)
    with torch.no_grad():
        if in_channels == 1:
            new.weight.copy_(old.weight.sum(dim=1, keepdim=True))
        else:
            new.weight.normal_(0.0, float(old.weight.std()) * (3 / in_channels) ** 0.5)
        if old.bias is not None:
            new.bias.copy_(old.bias)
    _replace(model, name, new)
    return name


def torchvision_backbone(in_channels: int, image_size: int, variant: str) -> Backbone:
    """Any torchvision classification model, randomly initialised, its classifier removed (torchvision:NAME)."""
    variant = _check_variant(variant)
    in_channels = _positive_int("in_channels", in_channels)
    image_size = _positive_int("image_size", image_size)
    if variant.startswith("vit_") and image_size % int(variant.rpartition("_")[2]):
        raise ValueError(f"{variant} needs an image size that is a multiple of its patch size "
                         f"{variant.rpartition('_')[2]}, got {image_size} px")
    try:
        model = torchvision.models.get_model(variant, **_build_options(variant, image_size))
    except SIZE_ERRORS as exc:
        raise ValueError(f"cannot build {variant} for {image_size} px images: {_one_line(exc)}") from None
    remove_classifier(model, SENTINEL_CLASSES)
    if in_channels != 3:
        adapt_stem(model, in_channels)
    out_features = _measure(model, variant, in_channels, image_size)
    return Backbone(module=model, out_features=out_features)


def _measure(model: nn.Module, variant: str, in_channels: int, image_size: int) -> int:
    """The feature size, from one forward pass of a zero image in eval mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            try:
                out = model(torch.zeros(1, in_channels, image_size, image_size))
            except SIZE_ERRORS as exc:
                smallest = _smallest_size(model, in_channels, image_size)
                advice = f"use at least {smallest} px" if smallest else "use larger ones"
                raise ValueError(f"{variant} does not work on {image_size} px images; {advice} "
                                 f"({type(exc).__name__}: {_one_line(exc)})") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 1:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{variant} gives {shape} without its classifier, not [batch, features]")
    return int(out.shape[1])


def _smallest_size(model: nn.Module, in_channels: int, failing: int, largest: int = 1024) -> int | None:
    """The smallest image size above ``failing`` that ``model`` takes (bisection), or None up to ``largest``."""
    def works(size: int) -> bool:
        try:
            model(torch.zeros(1, in_channels, size, size))
            return True
        except SIZE_ERRORS:
            return False

    low, high = failing, failing * 2
    while not works(high):
        if high >= largest:
            return None
        low, high = high, min(high * 2, largest)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if works(middle) else (middle, high)
    return high


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


@hookimpl
def metabench_register_backbones(register):
    register(f"{FAMILY}:*", torchvision_backbone)
