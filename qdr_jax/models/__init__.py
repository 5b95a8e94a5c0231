"""BERT-family text encoders in Flax linen, with Hugging Face weight loading."""

from qdr_jax.models.bert import BertEncoder, EncoderConfig, init_params
from qdr_jax.models.loading import (MINILM_ALIASES, default_model_path,
                                    encoder_config_from_hf, load_encoder,
                                    params_from_hf, params_to_hf,
                                    resolve_model_path, save_encoder_hf)
from qdr_jax.models.tokenization import (LENGTH_BUCKET, load_tokenizer,
                                         passage_inputs, tokenize)

__all__ = [
    'BertEncoder', 'EncoderConfig', 'LENGTH_BUCKET', 'MINILM_ALIASES', 'default_model_path',
    'encoder_config_from_hf', 'init_params', 'load_encoder', 'load_tokenizer',
    'params_from_hf', 'params_to_hf', 'passage_inputs', 'resolve_model_path',
    'save_encoder_hf', 'tokenize',
]
