"""Model registry: a plain dict from name to the model's config dataclass (which has `build(spec)`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from deeprecipe.core import DataSpec, UserError, lookup
from deeprecipe.models.cnn import CNNConfig, MLPConfig
from deeprecipe.models.detect import CenterNetConfig, TVDetectorConfig
from deeprecipe.models.fcn import FCNConfig
from deeprecipe.models.gan import DCGANConfig, GANConfig
from deeprecipe.models.gpt import GPTConfig
from deeprecipe.models.lstm import LSTMConfig
from deeprecipe.models.pix2pix import CycleGANConfig, Pix2PixConfig
from deeprecipe.models.resnet import ResNetConfig
from deeprecipe.models.seq2seq import Seq2SeqConfig
from deeprecipe.models.textclass import TextLSTMConfig, TextTransformerConfig
from deeprecipe.models.unet import ResNetUNetConfig, UNetConfig
from deeprecipe.models.video3d import C3DConfig, R2Plus1DConfig
from deeprecipe.models.zoo import TV_CONFIGS, TimmConfig
from deeprecipe.util import call_with, load_object

MODELS: dict[str, type] = {
    "mlp": MLPConfig,
    "cnn": CNNConfig,
    "resnet": ResNetConfig,
    "gpt": GPTConfig,
    "lstm": LSTMConfig,
    "seq2seq": Seq2SeqConfig,
    "unet": UNetConfig,
    "unet-resnet18": ResNetUNetConfig,  # a U-Net on torchvision's ResNet-18 encoder (pretrained starts)
    "fcn": FCNConfig,
    "c3d": C3DConfig,
    "r2plus1d": R2Plus1DConfig,
    "gan": GANConfig,
    "dcgan": DCGANConfig,
    "text-transformer": TextTransformerConfig,
    "text-lstm": TextLSTMConfig,
    "centernet": CenterNetConfig,
    "tv-detector": TVDetectorConfig,
    "pix2pix": Pix2PixConfig,
    "cyclegan": CycleGANConfig,
    **TV_CONFIGS,  # torchvision's classifiers, video nets and segmenters as published (models/zoo.py)
}


@dataclass
class UserModel:
    """`model.name: path/to/file.py:Name`: Name(**args) builds an nn.Module (num_classes, in_channels,
    image_size and vocab_size are passed when its signature names them and args does not)."""

    name: str = ""
    args: dict = field(default_factory=dict)

    def build(self, spec: DataSpec) -> nn.Module:
        available = {
            "num_classes": spec.num_classes,
            "in_channels": spec.in_channels,
            "image_size": spec.image_size,
            "vocab_size": spec.vocab_size,
        }
        obj = call_with(load_object(self.name), self.args, available)
        model = obj.build(spec) if hasattr(obj, "build") and not isinstance(obj, nn.Module) else obj
        if not isinstance(model, nn.Module):
            raise UserError(f"{self.name} must build a torch.nn.Module, got {type(model).__name__}")
        return model


def model_config_class(name: str) -> type:
    if name.startswith("timm:"):  # any timm model by its name (models/zoo.py)
        return TimmConfig
    return lookup(MODELS, name, "model", "model.name", UserModel)
