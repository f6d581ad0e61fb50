"""Everything the trainer reads: tokenizers, the training iterator, evaluation sets.

The training iterator is the Grain pipeline (`data/pipeline.py`): one dataset, hence one
modality, per batch. With `data.demo=True` the datasets are the bundled synthetic ones (written
on first use); otherwise they are the reference's datasets on disk, found by name through
`data/registry.py` under `data.root`, mixed with `data.train_ratios` (default sqrt(size)), and
tokenised with the LLM's own `data.llm_tokenizer`. Evaluation sets are decoded once,
deterministically, and keep each row's reference answers next to its arrays.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from absl import logging

from xblip_jax import config_utils
from xblip_jax.data import demo, pipeline, registry, templates
from xblip_jax.data import text as text_lib
from xblip_jax.data.demo_tokenizer import train_demo_tokenizer
from xblip_jax.data.example import Example, Examples, MediaError, RecordError
from xblip_jax.data.tokenizers import LlmTokenizer, QFormerTokenizer
from xblip_jax.eval import tasks as tasks_lib
from xblip_jax.models.assembly import PromptIds

CUES = {"image": " image: ", "pc": " 3d: ", "video": " video: ", "audio": " audio: "}
MEDIA_KEYS = ("image", "video", "audio", "pc")


@dataclasses.dataclass
class EvalSet:
  name: str
  batches: list[tuple[tuple[str, ...], dict[str, np.ndarray], list[dict]]]
  task: str | None = None  # `eval/tasks.py` key that scores it; None: by the set name
  prefix: str = ""  # the task's LLM text before the first cue (DisCRn); "": the run's prefix
  classnames: tuple[str, ...] = ()  # classification sets: the class list (reader's meta)


def prompt_ids(tok: LlmTokenizer, text_cfg: text_lib.TextConfig, modalities) -> PromptIds:
  """Prefix and cue ids, tokenised with BOS; clean tokenisation strips the cue's space."""
  cue = lambda m: CUES[m].lstrip() if text_cfg.clean_tokenization else CUES[m]
  return PromptIds(
      prefix=tuple(tok.encode(text_cfg.prefix, add_bos=True)) if text_cfg.prefix else (),
      cues=tuple((m, tuple(tok.encode(cue(m), add_bos=True))) for m in modalities),
      clean_tokenization=text_cfg.clean_tokenization)


def host_batch_size(global_batch: int) -> int:
  """This host's share of the global batch (`data.batch_size` is global)."""
  if global_batch % jax.process_count():
    raise config_utils.ConfigError(f"data.batch_size={global_batch} does not split over "
                                   f"{jax.process_count()} processes")
  return global_batch // jax.process_count()


def _template_texts() -> list[str]:
  return [t.replace("{}", "").lower() for per in templates.TEMPLATES.values()
          for pool in per.values() for t in pool]


class Inputs:
  """Training and evaluation inputs of one run."""

  def __init__(self, config, workdir: Path, train: bool = True):
    data = config.data
    self.workdir = workdir
    self.modalities = tuple(data.modalities)
    self.demo = bool(data.demo)
    self.train_names = tuple(data.train_datasets)
    self.text_cfg = config_utils.build(text_lib.TextConfig, {k: v for k, v in config.text.items()
                                                             if k != "prompt_len"}, "text")
    self.prompt_len = int(config.text.prompt_len)
    self.media = config_utils.build(pipeline.MediaOptions, dict(data.media), "data.media")
    self.seed = int(config.seed)
    self.eval_batch_size = int(data.eval_batch_size)
    self.eval_names = tuple(data.eval_datasets)
    self.eval_limit = int(config.eval.num_examples)
    self.read_skipped: dict[str, dict[str, int]] = {}
    self.train = train
    tok_path = self._demo_data(config) if self.demo else self._real_data(config)
    self.eval_tasks = self._eval_tasks()
    self.llm_tokenizer = LlmTokenizer.from_file(tok_path)
    self.qformer_tokenizer = QFormerTokenizer.bert_base_uncased(self.text_cfg.qformer_max_len)
    self.text = text_lib.TextEncoder(self.llm_tokenizer, self.qformer_tokenizer, self.text_cfg)
    self.prompt_ids = prompt_ids(self.llm_tokenizer, self.text_cfg, self.modalities)
    self.iterator: Iterator | None = None
    if train:  # --mode eval / generate (train=False) never read the training annotations
      specs = self._demo_specs(config) if self.demo else self._real_specs(config)
      self.pipeline = pipeline.build_pipeline(
          specs, self._encode_train,
          pipeline.PipelineConfig(batch_size=host_batch_size(int(data.batch_size)),
                                  seed=self.seed, num_threads=int(data.num_threads),
                                  max_bad_fraction=float(data.max_bad_fraction)))
      self.iterator = iter(self.pipeline)
    self._eval_sets: list[EvalSet] | None = None

  def _eval_tasks(self) -> dict[str, str | None]:
    """Each evaluation set's task key, checked now rather than after training."""
    out = {}
    for name in self.eval_names:
      task = None if self.demo else self._eval_sources[name].entry.eval_task
      try:
        tasks_lib.for_eval_set(name, task)
      except KeyError as e:
        raise config_utils.ConfigError(f"data.eval_datasets: {e.args[0]}") from None
      out[name] = task
    return out

  # --- data sources -----------------------------------------------------------------------
  def _demo_data(self, config) -> Path:
    """The bundled demo: written under `data.root` (default `<workdir>/demo_data`) once."""
    data = config.data
    root = Path(data.root) if data.root else self.workdir / "demo_data"
    if not (root / "manifest.json").exists():
      logging.info("writing demo data to %s", root)
      sizes = {k: tuple(v) for k, v in dict(data.get("demo_sizes", {})).items()}
      demo.write_demo_data(root, seed=int(config.seed),
                           sizes=config_utils.build(demo.DemoSizes, sizes, "data.demo_sizes"))
    self.root = root
    self.manifest = demo.load_manifest(root)
    tok_path = Path(data.llm_tokenizer) if data.llm_tokenizer else root / "llm_tokenizer"
    if not (tok_path / "tokenizer.model").exists() and not data.llm_tokenizer:
      texts = demo.demo_texts(self.manifest) + _template_texts() + list(CUES.values())
      train_demo_tokenizer(texts + [self.text_cfg.prefix, self.text_cfg.postfix],
                           tok_path / "tokenizer.model", vocab_size=int(data.demo_vocab_size))
    for name in tuple(data.train_datasets) + self.eval_names:
      if name not in self.manifest:
        raise config_utils.ConfigError(f"data: unknown dataset {name!r}; the demo has "
                                       f"{sorted(self.manifest)}")
    return tok_path

  def _demo_specs(self, config) -> list[pipeline.DatasetSpec]:
    specs = demo.demo_specs(self.manifest, "train", names=list(config.data.train_datasets),
                            media=self.media)
    ratios = _train_ratios(config.data.get("train_ratios", None), self.train_names)
    return [dataclasses.replace(s, weight=w) for s, w in zip(specs, ratios, strict=True)]

  def _real_data(self, config) -> Path:
    """Datasets on disk, named as the reference's yamls (`data/registry.py`)."""
    data = config.data
    if not data.root:
      raise config_utils.ConfigError(
          "data.root is empty: set it to the folder holding the datasets (LAVIS cache_root "
          "layout, see docs/launch.md), or use data.demo=True")
    self.root = Path(data.root)
    self.manifest = {}
    tok_path = _llm_tokenizer_path(data.get("llm_tokenizer", ""))
    paths = dict(data.get("paths", None) or {})
    self._eval_sources = {name: self._resolve(name, paths, "data.eval_datasets")
                          for name in self.eval_names}
    return tok_path

  def _real_specs(self, config) -> list[pipeline.DatasetSpec]:
    """The training datasets, read from disk (only when training)."""
    data = config.data
    paths = dict(data.get("paths", None) or {})
    ratios = _train_ratios(data.get("train_ratios", None), self.train_names)
    specs = []
    for name, weight in zip(self.train_names, ratios, strict=True):
      found = self._resolve(name, paths, "data.train_datasets")
      entry = found.entry
      if found.shards:  # prepared ArrayRecord shards: records are read when drawn
        from xblip_jax.data.tfds import source  # pylint: disable=import-outside-toplevel
        examples = source.shard_examples(found.shards, entry.split)
      else:
        examples = self._read(found)
      specs.append(pipeline.DatasetSpec(
          name=name, examples=examples, weight=weight,
          media=dataclasses.replace(self.media, **dict(entry.options)), **dict(entry.spec)))
      logging.info("dataset %s: %d examples from %s", name, len(examples),
                   found.shards or found.annotations)
    return specs

  def _resolve(self, name: str, paths: dict, where: str) -> registry.Resolved:
    override = paths.get(name)
    found = registry.resolve(name, self.root, dict(override) if override else None, where=where)
    missing = [m for m in found.entry.modalities if m not in self.modalities]
    if missing:
      raise config_utils.ConfigError(f"{where}: dataset {name!r} needs modalities {missing} "
                                     f"that data.modalities={self.modalities} lacks")
    return found

  def _read(self, found: registry.Resolved) -> Examples:
    examples = registry.read(found)
    if examples.skipped:
      self.read_skipped[found.name] = dict(examples.skipped)
    if not examples:
      raise config_utils.ConfigError(
          f"dataset {found.name!r}: no usable record in {found.annotations} (skipped: "
          f"{dict(examples.skipped)}); check data.paths.{found.name}")
    return examples

  # --- training ---------------------------------------------------------------------------
  def _encode_train(self, ex: Example) -> dict[str, np.ndarray]:
    return self.text(ex.text_input, ex.text_output)

  def _train_iterator(self) -> Iterator:
    if self.iterator is None:
      raise RuntimeError("inputs built with train=False have no training pipeline")
    return self.iterator

  def next_train(self) -> tuple[tuple[str, ...], dict[str, np.ndarray]]:
    batch = next(self._train_iterator())
    order = tuple(m for m in MEDIA_KEYS if m in batch)
    return order, batch

  def get_state(self) -> Any:
    return self._train_iterator().get_state()

  def set_state(self, state: Any) -> None:
    self._train_iterator().set_state(state)

  def stats(self) -> dict[str, Any]:
    bad = {} if self.iterator is None else pipeline.bad_record_counts(self.iterator.get_state())
    out = {"bad_records": bad,
           "eval_skipped": getattr(self, "eval_skipped", {})}
    if self.read_skipped:  # records the readers left out (missing fields or media files)
      out["read_skipped"] = self.read_skipped
    return out

  # --- evaluation -------------------------------------------------------------------------
  def eval_sets(self) -> list[EvalSet]:
    if self._eval_sets is None:
      self._eval_sets = [self._eval_set(name) for name in self.eval_names]
    return self._eval_sets

  def _eval_set(self, name: str) -> EvalSet:
    examples, media_opts = self._eval_examples(name)
    task = self.eval_tasks[name]
    task_def = tasks_lib.TASKS[task] if task else None
    rows, skipped = [], {}
    for i, ex in enumerate(examples):
      rng = np.random.default_rng([self.seed, 7, i])
      refs = list(ex.answers) or ([ex.text_output] if isinstance(ex.text_output, str)
                                  else list(ex.text_output))
      try:
        question = ex.text_input
        ex = templates.instruct(ex, rng)
        if task_def is not None:  # the task's own prompt, as the reference's eval yamls
          ex = ex.replace(text_input=task_def.format_prompt(question or None))
        arrays = pipeline.load_media(ex, rng, train=False, opts=media_opts)
      except (MediaError, RecordError) as e:
        skipped[type(e).__name__] = skipped.get(type(e).__name__, 0) + 1
        logging.warning("eval %s: skipped %s", name, e)
        continue
      arrays.update(self.text(ex.text_input, ex.text_output))
      arrays.update(self.text.prompt(ex.text_input, self.prompt_len))
      if task_def is not None and task_def.qformer_prompt is not None:  # DisCRn: fixed text
        arrays.update(text_lib.qformer_text(self.qformer_tokenizer, task_def.qformer_prompt,
                                            self.text_cfg.qformer_max_len))
      rows.append((ex.modalities, arrays, {"id": ex.id, "task": ex.task,
                                           "instruction": ex.text_input, "answers": refs}))
    if skipped:
      self.eval_skipped = {**getattr(self, "eval_skipped", {}), name: skipped}
    batches = []
    for start in range(0, len(rows), self.eval_batch_size):
      chunk = rows[start:start + self.eval_batch_size]
      refs = [r[2] for r in chunk]
      # Pad the last batch to the full size (one compiled shape); padded rows carry no labels
      # and no references, so they count in neither the loss nor the accuracy.
      filler = dict(chunk[-1][1], llm_text_labels=np.full_like(
          chunk[-1][1]["llm_text_labels"], text_lib.IGNORE))
      arrays = [r[1] for r in chunk] + [filler] * (self.eval_batch_size - len(chunk))
      batch = {k: np.stack([a[k] for a in arrays]) for k in arrays[0]}
      batches.append((tuple(chunk[0][0]), batch, refs))
    return EvalSet(name, batches, task=task, prefix=task_def.prefix if task_def else "",
                   classnames=tuple(examples[0].meta.get("classnames", ())) if examples else ())

  def eval_prompt_ids(self, eval_set: EvalSet) -> PromptIds:
    """The run's prompt ids, with the set's task prefix (with BOS) in place of the run's."""
    if not eval_set.prefix:
      return self.prompt_ids
    return dataclasses.replace(self.prompt_ids, prefix=tuple(
        self.llm_tokenizer.encode(eval_set.prefix, add_bos=True)))

  def _eval_examples(self, name: str) -> tuple[Sequence[Example], pipeline.MediaOptions]:
    if self.demo:
      entry = self.manifest[name]["val"]
      return (demo.read_demo(entry)[:self.eval_limit],
              dataclasses.replace(self.media, **entry.options))
    found = self._eval_sources[name]
    if found.shards:
      raise config_utils.ConfigError(f"data.paths.{name}.shards: evaluation sets are read from "
                                     "their raw files")
    examples = self._read(found)
    if self.eval_limit:  # 0: the whole split
      examples = examples[:self.eval_limit]
    return examples, dataclasses.replace(self.media, **dict(found.entry.options))

  def decode(self, ids: Sequence[int]) -> str:
    ids = list(ids)
    if self.llm_tokenizer.eos_id in ids:
      ids = ids[:ids.index(self.llm_tokenizer.eos_id)]
    return self.llm_tokenizer.decode(ids).strip()


def build_inputs(config, workdir: Path, train: bool = True) -> Inputs:
  return Inputs(config, workdir, train=train)


def pretrained_weights(config, inputs: Inputs) -> dict[tuple[str, ...], Path]:
  """Orbax directories of the pretrained frozen towers, by model path.

  `model.llm_init`: "random", "demo" (the demo LLM, pretrained on the demo text once, see
  `demo_llm.py`) or an Orbax directory of the LLM's parameter tree (as the converters write
  it); `model.encoders_init`: `{modality: Orbax directory}` (absent: random encoders; "demo":
  the demo's PCA-fitted 3D encoder, see `demo_encoders.py`).
  """
  out: dict[tuple[str, ...], Path] = {}
  llm_init = config.model.get("llm_init", "random")
  if llm_init == "demo" and not inputs.demo:
    raise config_utils.ConfigError("model.llm_init='demo' needs data.demo=True; give the "
                                   "converted LLM's Orbax directory (or 'random')")
  if llm_init == "demo":
    from xblip_jax.train import demo_llm  # pylint: disable=import-outside-toplevel

    out[("llm",)] = demo_llm.ensure_pretrained(inputs, config)
  elif llm_init not in ("random", ""):
    out[("llm",)] = _existing(llm_init, "model.llm_init")
  for modality, path in dict(config.model.get("encoders_init", None) or {}).items():
    if path == "demo" and modality not in inputs.modalities:
      continue  # the demo config's default for a modality this run leaves out
    if modality not in inputs.modalities:
      raise config_utils.ConfigError(f"model.encoders_init.{modality}: not a configured "
                                     f"modality {inputs.modalities}")
    if path == "demo":
      if not inputs.demo:
        raise config_utils.ConfigError(f"model.encoders_init.{modality}='demo' needs "
                                       "data.demo=True")
      from xblip_jax.train import demo_encoders  # pylint: disable=import-outside-toplevel

      out[("encoders", modality)] = demo_encoders.ensure_pretrained(inputs, config, modality)
    elif path:
      out[("encoders", modality)] = _existing(path, f"model.encoders_init.{modality}")
  return out


def _llm_tokenizer_path(value: str) -> Path:
  """`data.llm_tokenizer`: a folder holding `tokenizer.model` (as HF checkpoints ship it) or
  the file itself."""
  if not value:
    raise config_utils.ConfigError("data.llm_tokenizer is empty: give the folder holding the "
                                   "LLM's SentencePiece tokenizer.model (e.g. the Vicuna "
                                   "checkpoint folder)")
  path = Path(value)
  if not (path / "tokenizer.model").is_file() and not (path.is_file() and path.name.endswith(
      ".model")):
    raise config_utils.ConfigError(f"data.llm_tokenizer={value!r}: no tokenizer.model there")
  return path


def _train_ratios(ratios, names: Sequence[str]) -> list[float | None]:
  """`data.train_ratios` as mixing weights; empty -> sqrt(size) for every dataset."""
  if not ratios:
    return [None] * len(names)
  ratios = list(ratios)
  if len(ratios) != len(names):
    raise config_utils.ConfigError(f"data.train_ratios has {len(ratios)} entries for "
                                   f"{len(names)} data.train_datasets")
  if any(not isinstance(r, (int, float)) or isinstance(r, bool) or r <= 0 for r in ratios):
    raise config_utils.ConfigError(f"data.train_ratios must be positive numbers, got {ratios}")
  return [float(r) for r in ratios]


def _existing(path: str, where: str) -> Path:
  if not Path(path).is_dir():
    raise config_utils.ConfigError(f"{where}={path!r}: not an Orbax directory of parameters "
                                   "(use 'random' for random weights)")
  return Path(path)
