"""so8t_jax: distil large language models (GGUF or Hugging Face teachers) into small ones with JAX."""
from so8t_jax.config import ConfigError, ModelConfig
from so8t_jax.loading import Model, convert, load
from so8t_jax.sampling import Sampler, generate
from so8t_jax.weights.common import WeightsError

__all__ = ["ConfigError", "Model", "ModelConfig", "Sampler", "WeightsError", "convert", "generate", "load"]
__version__ = "0.1.0"
