"""Wan's entry in the backbone registry (``engine.backbones.registry``)."""
from ..backbone import Backbone
from ..families import WAN
from .components import TextEncoder, Vae
from .loading import load_wan
from .model import MultiViewWanTransformer

BACKBONE = Backbone(WAN, MultiViewWanTransformer, load_wan, TextEncoder, Vae)
