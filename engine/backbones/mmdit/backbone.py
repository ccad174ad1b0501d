"""The MMDiT's (HunyuanVideo's) entry in the backbone registry (``engine.backbones.registry``)."""
from ..backbone import Backbone
from ..families import MMDIT
from .components import MMDiTTextEncoder, MMDiTVae
from .loading import load_mmdit
from .model import MultiViewMMDiT

BACKBONE = Backbone(MMDIT, MultiViewMMDiT, load_mmdit, MMDiTTextEncoder, MMDiTVae)
