"""Dual encoder: query and passage BERT towers, shared (siamese) or separate.

Parameters are a dict of towers: `{"shared": bert}` or `{"query": bert, "passage": bert}`.
A `dense_tanh` projection (the QGen paper's [CLS] + dense + tanh) is exactly BERT's pooler,
so it loads from and exports to the checkpoint's `pooler.dense` weights.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxret.models import hf_bert
from jaxret.models.bert import BertConfig, BertModel
from jaxret.parallel.activations import Activations

Tower = Literal["query", "passage"]
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
SPEC_FILE = "jaxret.json"


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
    """How token rows become vectors and vectors become scores (hashable: a jit static arg)."""

    shared: bool = True
    pooling: Literal["cls", "mean"] = "cls"
    projection: Literal["none", "dense_tanh"] = "none"
    normalize: bool = False
    similarity: Literal["dot", "cosine"] = "dot"
    scale: float = 1.0  # multiplies cosine similarity
    # pair: ART/DPR [CLS] title [SEP] text [SEP], types 0; hf_pair: HF sentence pair (types
    # 0/1, longest-first cut); join: "title text" (jaxret.data.tokenization)
    passage_format: Literal["pair", "hf_pair", "join"] = "pair"
    max_query_length: int = 64
    max_passage_length: int = 256
    dtype: Literal["float32", "bfloat16"] = "float32"
    # Rematerialize layers in the backward pass: "none", "query", "passage" (ART: the B·K
    # passages dominate activation memory) or "both"; True / False mean "both" / "none".
    remat: bool | str = "none"

    def __post_init__(self) -> None:
        if isinstance(self.remat, bool):
            object.__setattr__(self, "remat", "both" if self.remat else "none")
        checks = {
            "pooling": ("cls", "mean"),
            "projection": ("none", "dense_tanh"),
            "similarity": ("dot", "cosine"),
            "passage_format": ("pair", "hf_pair", "join"),
            "dtype": tuple(_DTYPES),
            "remat": ("none", "query", "passage", "both"),
        }
        for name, allowed in checks.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}; expected one of {allowed}")

    @classmethod
    def from_config(cls, cfg: Any) -> EncoderSpec:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in dict(cfg).items() if k in names})


@dataclasses.dataclass(frozen=True)
class DualEncoder:
    bert: BertConfig
    spec: EncoderSpec
    act: Activations | None = None  # activation sharding inside the towers

    def with_activations(self, act: Activations | None) -> DualEncoder:
        return dataclasses.replace(self, act=act)

    @property
    def dim(self) -> int:
        return self.bert.hidden_size

    def tower_names(self) -> tuple[str, ...]:
        return ("shared",) if self.spec.shared else ("query", "passage")

    def tower_params(self, params: dict, tower: Tower) -> dict:
        return params["shared"] if self.spec.shared else params[tower]

    def module(self, tower: Tower = "passage") -> BertModel:
        remat = self.spec.remat in ("both", tower)
        return BertModel(self.bert, dtype=_DTYPES[self.spec.dtype], remat=remat, act=self.act)

    def embed(
        self,
        params: dict,
        tower: Tower,
        tokens: dict[str, jax.Array],  # input_ids/attention_mask/token_type_ids: [B, L] int32
        *,
        dropout_rng: jax.Array | None = None,
    ) -> jax.Array:
        """[B, d] fp32 embeddings. Dropout is on iff a `dropout_rng` is given."""
        mask = tokens["attention_mask"]
        hidden, pooled = self.module(tower).apply(
            {"params": self.tower_params(params, tower)},
            tokens["input_ids"],
            mask,
            tokens.get("token_type_ids"),
            deterministic=dropout_rng is None,
            rngs=None if dropout_rng is None else {"dropout": dropout_rng},
        )
        hidden = hidden.astype(jnp.float32)
        if self.spec.projection == "dense_tanh":
            out = pooled.astype(jnp.float32)
        elif self.spec.pooling == "cls":
            out = hidden[:, 0]
        else:
            m = mask.astype(jnp.float32)[..., None]
            out = (hidden * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)
        if self.spec.normalize or self.spec.similarity == "cosine":
            out = out / jnp.maximum(jnp.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
        return out

    def score(self, q: jax.Array, p: jax.Array) -> jax.Array:
        """q [B, d] × p [N, d] → [B, N]; with cosine similarity both are unit vectors already."""
        s = jnp.einsum("bd,nd->bn", q, p, preferred_element_type=jnp.float32)
        return s * self.spec.scale if self.spec.similarity == "cosine" else s


def export_folder(model: str | os.PathLike) -> Path | None:
    """The jaxret export behind `model` (an export, a training workdir or its best/), if any."""
    folder = Path(model)
    if (folder / SPEC_FILE).is_file():  # an export
        return folder
    if (folder / "export" / SPEC_FILE).is_file():  # a training workdir
        return folder / "export"
    if (folder / "best.json").is_file() and (folder.parent / "export" / SPEC_FILE).is_file():
        return folder.parent / "export"  # a workdir's best/
    return None


def _restore_params(directory: Path, like: dict) -> dict:
    import orbax.checkpoint as ocp

    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), like)
    restored = ocp.StandardCheckpointer().restore(directory.absolute(), target)
    return jax.tree.map(np.asarray, restored)


def _with_pooler(cfg: BertConfig, params: dict, rng: jax.Array) -> tuple[BertConfig, dict]:
    """Adds a freshly initialized pooler when the checkpoint has none but dense_tanh needs one."""
    if cfg.add_pooler:
        return cfg, params
    cfg = dataclasses.replace(cfg, add_pooler=True)
    ids = jnp.zeros((1, 2), jnp.int32)
    fresh = BertModel(cfg).init(rng, ids, ids)["params"]["pooler"]
    return cfg, {**params, "pooler": jax.device_get(fresh)}


def from_pretrained(
    model: str | os.PathLike,
    spec: EncoderSpec | None = None,
    passage_model: str | os.PathLike | None = None,
    rng: jax.Array | None = None,
) -> tuple[DualEncoder, dict, Path]:
    """Builds a dual encoder from an HF BERT checkpoint (both towers) or a jaxret export.

    Returns (encoder, params, folder holding the tokenizer). A jaxret export (a folder with
    `jaxret.json`) carries its own spec, used when `spec` is None. A training workdir means
    its final export; its `best/` folder, the best-by-dev parameters on that structure.
    """
    folder = Path(model)
    if (folder / "params").is_dir() and (folder / "best.json").is_file():
        encoder, params, tok = from_pretrained(folder.parent / "export", spec, passage_model, rng)
        return encoder, _restore_params(folder / "params", params), tok
    if (folder / "export" / SPEC_FILE).is_file():
        folder = folder / "export"
    if (folder / SPEC_FILE).is_file():
        with open(folder / SPEC_FILE) as f:
            saved = json.load(f)
        spec = spec or EncoderSpec(**saved["spec"])
        towers = saved["towers"]
        if spec.shared != (len(towers) == 1):
            raise ValueError(f"{folder}: spec.shared={spec.shared} but the export has {towers}")
        loaded = {t: hf_bert.load_bert(folder / sub) for t, sub in towers.items()}
        cfg = next(iter(loaded.values()))[0]
        params = {t: p for t, (_, p, _) in loaded.items()}
        return DualEncoder(cfg, spec), params, folder / next(iter(towers.values()))
    spec = spec or EncoderSpec()
    rng = jax.random.key(0) if rng is None else rng
    cfg, query_params, tok_folder = hf_bert.load_bert(model)
    params = {"shared": query_params} if spec.shared else {"query": query_params}
    if not spec.shared:
        p_cfg, p_params, _ = hf_bert.load_bert(passage_model or model)
        if dataclasses.replace(p_cfg, add_pooler=False) != dataclasses.replace(
            cfg, add_pooler=False
        ):
            raise ValueError("query and passage checkpoints must share one BERT architecture")
        params["passage"] = p_params
    if spec.projection == "dense_tanh":
        for i, t in enumerate(params):
            cfg, params[t] = _with_pooler(cfg, params[t], jax.random.fold_in(rng, i))
    else:
        cfg = dataclasses.replace(cfg, add_pooler=False)
        params = {t: {k: v for k, v in p.items() if k != "pooler"} for t, p in params.items()}
    return DualEncoder(cfg, spec), params, tok_folder


def export(
    encoder: DualEncoder, params: dict, out: str | os.PathLike, tokenizer: Any
) -> dict[str, Path]:
    """Writes each tower as an HF folder (config, safetensors, tokenizer) plus `jaxret.json`.

    The folders load with `transformers.AutoModel.from_pretrained`; the embedding is the
    pooler output for `dense_tanh`, else the pooled last hidden state (see jaxret.json).
    """
    out = Path(out)
    host = jax.device_get(params)
    names = (
        {"shared": "encoder"}
        if encoder.spec.shared
        else {
            "query": "query_encoder",
            "passage": "passage_encoder",
        }
    )
    folders = {}
    for tower, sub in names.items():
        hf_bert.save_bert(out / sub, encoder.bert, host[tower])
        tokenizer.save_pretrained(str(out / sub))
        folders[tower] = out / sub
    with open(out / SPEC_FILE, "w") as f:
        json.dump(
            {"spec": dataclasses.asdict(encoder.spec), "towers": names}, f, indent=2, sort_keys=True
        )
    return folders


def param_count(params: dict) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
