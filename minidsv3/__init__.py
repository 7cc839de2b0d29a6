"""minidsv3: DeepSeek-V3 rebuilt from scratch, one idea per module.

    from minidsv3 import ModelConfig, DeepSeekV3
    model = DeepSeekV3(ModelConfig.preset("toy"))
"""

from .config import ModelConfig, RopeScaling
from .generate import generate
from .hf import load_pretrained, save_pretrained
from .model import Block, DeepSeekV3, ModelOutput, set_seed

__all__ = ["ModelConfig", "RopeScaling", "DeepSeekV3", "Block", "ModelOutput", "set_seed",
           "generate", "load_pretrained", "save_pretrained"]
__version__ = "0.1.0"
