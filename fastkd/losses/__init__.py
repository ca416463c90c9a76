"""nn.Modules that own the trainable parts of the distillation losses and call fastkd.ops."""
from .ct import CT
from .kd import LogitKD
from .mgd import MGD
from .registry import FeatureLoss, feature_loss, register_loss
from .seg_kd import ChannelWiseKD
from .seeds import SeedStream

__all__ = ["MGD", "CT", "LogitKD", "ChannelWiseKD", "SeedStream", "FeatureLoss", "feature_loss", "register_loss"]
