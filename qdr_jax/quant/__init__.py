"""Product quantization and RaBitQ in JAX that mirror a trained FAISS index."""

from qdr_jax.quant.faiss_bridge import quantizer_from_faiss
from qdr_jax.quant.faiss_bridge import stored_codes
from qdr_jax.quant.faiss_bridge import supports_straight_through
from qdr_jax.quant.faiss_bridge import write_codebooks_to_faiss
from qdr_jax.quant.faiss_bridge import write_quantizer_to_faiss
from qdr_jax.quant.pq import INDEX_PARAMS
from qdr_jax.quant.pq import Quantizer
from qdr_jax.quant.pq import adc_scores
from qdr_jax.quant.pq import assign_coarse
from qdr_jax.quant.pq import coarse_scores
from qdr_jax.quant.pq import decode
from qdr_jax.quant.pq import encode
from qdr_jax.quant.pq import encode_with_lists
from qdr_jax.quant.pq import index_params
from qdr_jax.quant.pq import orthogonalize
from qdr_jax.quant.pq import quantize
from qdr_jax.quant.pq import rotate
from qdr_jax.quant.pq import straight_through
from qdr_jax.quant.pq import unrotate
from qdr_jax.quant.pq import with_index_params
from qdr_jax.quant.rabitq import RaBitQ

__all__ = [
    "INDEX_PARAMS",
    "Quantizer",
    "RaBitQ",
    "adc_scores",
    "assign_coarse",
    "coarse_scores",
    "decode",
    "encode",
    "encode_with_lists",
    "index_params",
    "orthogonalize",
    "quantize",
    "quantizer_from_faiss",
    "rotate",
    "stored_codes",
    "straight_through",
    "supports_straight_through",
    "unrotate",
    "with_index_params",
    "write_codebooks_to_faiss",
    "write_quantizer_to_faiss",
]
