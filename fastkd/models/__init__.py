"""fastkd's model zoo and the model contract every distiller input follows.

The contract (native models implement it in ``forward``, without hooks, so they compile under
``torch.compile(fullgraph=True)``; foreign models get it from :func:`adapt`):

- ``model(x)`` -> logits ``[N, num_classes]``;
- ``model(x, features=True)`` -> ``(logits, feats)``, feats a dict ``{stage name: [N, C, H, W]}``
  holding every stage, in input-to-output order;
- ``model.feature_channels: dict[str, int]`` and ``model.feature_reductions: dict[str, int]`` (the
  spatial downsampling of each stage with respect to the input), known without a forward;
- stage names are module names of the model (``model.get_submodule(name)`` exists).

Native models (``list_models()``) and their stages:

    resnet18/34/50/101/152, resnext50_32x4d, wide_resnet50_2   layer1..layer4   /4, /8, /16, /32
        (torchvision's state_dict keys and shapes: torchvision checkpoints load with strict=True)
    mobilenet_v1          model.1, model.3, model.5, model.11, model.13         /2 ... /32
    resnet8/14/20/32/44/56/110, resnet8x4, resnet32x4 (CIFAR)   layer1..layer3   /1, /2, /4
    convnet_tiny/small/base (Fashion-MNIST-sized)               stage1..stage3   /2, /4, /8

All take ``num_classes`` and ``in_channels`` (default 3). ``build("tv:<name>")`` /
``build("timm:<name>")`` build torchvision / timm models when those packages import. A task's own
models (segmentation's PSPNet / DeepLabV3, detection's torchvision detectors) live in its package
under ``fastkd.tasks``; ``build(name, zoo=...)`` knows the names of such a table too.

Example::
    from fastkd import models
    student = models.build("resnet18", num_classes=1000)
    logits, feats = student(images, features=True)    # feats["layer4"]: [N, 512, H/32, W/32]
"""
from .adapter import FeatureAdapter, adapt
from .cifar_resnet import CifarResNet
from .convnet import ConvNet
from .mobilenet import MobileNetV1
from .registry import build, list_models
from .resnet import BasicBlock, Bottleneck, ResNet

__all__ = ["build", "list_models", "adapt", "FeatureAdapter", "ResNet", "BasicBlock", "Bottleneck",
           "MobileNetV1", "CifarResNet", "ConvNet"]
