"""Dual encoder: query and passage BERT towers, shared (siamese) or separate.

Parameters are a dict of towers: `{"shared": bert}` or `{"query": bert, "passage": bert}`.
A `dense_tanh` projection (the QGen paper's [CLS] + dense + tanh) to the hidden size is
exactly BERT's pooler, so it loads from and exports to the checkpoint's `pooler.dense`
weights. To another dimension `projection_dim` (the paper's embedding-size ablation) it is a
head of its own, `params[tower]["projection"]`, exported beside the tower as
`projection.safetensors` (kernel [hidden, d], bias [d]).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxret import dtypes
from jaxret.models import hf_bert, hf_io
from jaxret.models.bert import BertConfig, BertModel
from jaxret.parallel.activations import Activations

Tower = Literal["query", "passage"]
SPEC_FILE = "jaxret.json"

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
    """How token rows become vectors and vectors become scores (hashable: a jit static arg)."""

    shared: bool = True
    pooling: Literal["cls", "mean"] = "cls"
    projection: Literal["none", "dense_tanh"] = "none"
    projection_dim: int = 0  # dense_tanh's output size; 0 = the hidden size (BERT's pooler)
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
            "dtype": dtypes.NAMES,
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

    def __post_init__(self) -> None:
        # Longer inputs would index past the position table, which XLA clamps: silently
        # wrong embeddings, never an error.
        positions = self.bert.max_position_embeddings
        for field in ("max_query_length", "max_passage_length"):
            if getattr(self.spec, field) > positions:
                raise ValueError(
                    f"model.{field}={getattr(self.spec, field)} exceeds the model's "
                    f"{positions} positions; set --config.model.{field}={positions} or less"
                )

    def with_activations(self, act: Activations | None) -> DualEncoder:
        return dataclasses.replace(self, act=act)

    @property
    def dim(self) -> int:
        if self.spec.projection == "dense_tanh" and self.spec.projection_dim:
            return self.spec.projection_dim
        return self.bert.hidden_size

    @property
    def separate_head(self) -> bool:
        """dense_tanh to a size other than the hidden size: a head of its own, not the pooler."""
        d = self.spec.projection_dim
        return self.spec.projection == "dense_tanh" and d not in (0, self.bert.hidden_size)

    def tower_names(self) -> tuple[str, ...]:
        return ("shared",) if self.spec.shared else ("query", "passage")

    def tower_params(self, params: dict, tower: Tower) -> dict:
        return params["shared"] if self.spec.shared else params[tower]

    def module(self, tower: Tower = "passage") -> BertModel:
        remat = self.spec.remat in ("both", tower)
        return BertModel(
            self.bert, dtype=dtypes.by_name(self.spec.dtype), remat=remat, act=self.act
        )

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
        head = self.tower_params(params, tower).get("projection")
        if self.spec.projection == "dense_tanh" and head is not None:
            cls = hidden[:, 0]
            out = jnp.tanh(
                cls @ head["kernel"].astype(jnp.float32) + head["bias"].astype(jnp.float32)
            )
        elif self.spec.projection == "dense_tanh":
            out = pooled.astype(jnp.float32)
        elif self.spec.pooling == "cls":
            out = hidden[:, 0]
        else:
            m = mask.astype(jnp.float32)[..., None]
            out = (hidden * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)
        if self.spec.normalize or self.spec.similarity == "cosine":
            out = out / jnp.maximum(jnp.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
        return out

    @property
    def logit_scale(self) -> float:
        """What `score` multiplies q·p by: `spec.scale` for cosine, 1 for the dot product."""
        return float(self.spec.scale) if self.spec.similarity == "cosine" else 1.0

    def score(self, q: jax.Array, p: jax.Array) -> jax.Array:
        """q [B, d] × p [N, d] → [B, N]; with cosine similarity both are unit vectors already."""
        s = jnp.einsum("bd,nd->bn", q, p, preferred_element_type=jnp.float32)
        return s * self.logit_scale if self.logit_scale != 1.0 else s


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


def tokenizer_folder(model: str | os.PathLike) -> Path:
    """The folder holding `model`'s tokenizer (as `from_pretrained` returns it), without
    reading any weights: what `jaxret prepare` needs."""
    folder = Path(model)
    if (folder / "params").is_dir() and (folder / "best.json").is_file():
        folder = folder.parent  # a workdir's best/: its export's tokenizer
    export = export_folder(folder)
    if export is not None:
        towers = json.loads((export / SPEC_FILE).read_text())["towers"]
        return export / next(iter(towers.values()))
    return hf_io.resolve_checkpoint(model)


def spec_for(model: str | os.PathLike, spec: EncoderSpec) -> EncoderSpec:
    """`spec` as `from_pretrained(model, spec)` uses it (lengths cut to the model's position
    table), read from the model's config.json alone: what `jaxret prepare` tokenizes for
    without loading weights, so that the training run finds the table it built."""
    config = json.loads((tokenizer_folder(model) / "config.json").read_text())
    return fit_positions(spec, int(config["max_position_embeddings"]))


def _with_pooler(cfg: BertConfig, params: dict, rng: jax.Array) -> tuple[BertConfig, dict]:
    """Adds a freshly initialized pooler when the checkpoint has none but dense_tanh needs one."""
    if cfg.add_pooler:
        return cfg, params
    cfg = dataclasses.replace(cfg, add_pooler=True)
    ids = jnp.zeros((1, 2), jnp.int32)
    fresh = BertModel(cfg).init(rng, ids, ids)["params"]["pooler"]
    return cfg, {**params, "pooler": jax.device_get(fresh)}


HEAD_FILE = "projection.safetensors"


def init_head(hidden_size: int, dim: int, rng: jax.Array) -> dict:
    """A fresh dense_tanh head: kernel [hidden, d] ~ N(0, 0.02²) as BERT's initializer, bias 0."""
    kernel = 0.02 * jax.random.normal(rng, (hidden_size, dim), jnp.float32)
    return {"kernel": np.asarray(kernel), "bias": np.zeros((dim,), np.float32)}


def _load_head(folder: Path) -> dict | None:
    from safetensors.numpy import load_file

    return load_file(folder / HEAD_FILE) if (folder / HEAD_FILE).is_file() else None


def fit_positions(spec: EncoderSpec, n: int) -> EncoderSpec:
    """`spec` with lengths beyond the model's `n` positions cut to them, with a warning (as
    sentence-transformers caps max_seq_length): longer inputs cannot be encoded."""
    over = {f: n for f in ("max_query_length", "max_passage_length") if getattr(spec, f) > n}
    for field in over:
        log.warning(
            "model.%s=%d > the model's %d positions: using %d", field, getattr(spec, field), n, n
        )
    return dataclasses.replace(spec, **over) if over else spec


def read_best_params(best: str | os.PathLike, like: Any) -> Any:
    """Host (numpy) copies of the parameters in a training run's `best/` folder (written by
    jaxret.train.checkpoint), restored onto the
    structure, shapes and dtypes of `like` (host arrays)."""
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), like)
    restored = ocp.StandardCheckpointer().restore((Path(best) / "params").absolute(), target)
    return jax.tree.map(np.asarray, restored)


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
        return encoder, read_best_params(folder, params), tok
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
        encoder = DualEncoder(cfg, fit_positions(spec, cfg.max_position_embeddings))
        for t, sub in towers.items():
            head = _load_head(folder / sub)
            if encoder.separate_head and head is None:
                raise ValueError(
                    f"{folder / sub}: spec asks for a {spec.projection_dim}-d head "
                    f"but there is no {HEAD_FILE}"
                )
            if head is not None:
                params[t] = {**params[t], "projection": head}
        return encoder, params, folder / next(iter(towers.values()))
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
    spec = fit_positions(spec, cfg.max_position_embeddings)
    encoder = DualEncoder(dataclasses.replace(cfg, add_pooler=False), spec)
    if encoder.separate_head:
        params = {
            t: {
                **{k: v for k, v in p.items() if k != "pooler"},
                "projection": init_head(
                    cfg.hidden_size, spec.projection_dim, jax.random.fold_in(rng, i)
                ),
            }
            for i, (t, p) in enumerate(params.items())
        }
    elif spec.projection == "dense_tanh":
        for i, t in enumerate(params):
            cfg, params[t] = _with_pooler(cfg, params[t], jax.random.fold_in(rng, i))
        encoder = DualEncoder(cfg, encoder.spec)
    else:
        params = {t: {k: v for k, v in p.items() if k != "pooler"} for t, p in params.items()}
    return encoder, params, tok_folder


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
        body = {k: v for k, v in host[tower].items() if k != "projection"}
        hf_bert.save_bert(out / sub, encoder.bert, body)
        if "projection" in host[tower]:
            from safetensors.numpy import save_file

            head = {
                k: np.ascontiguousarray(v, np.float32) for k, v in host[tower]["projection"].items()
            }
            save_file(head, out / sub / HEAD_FILE)
        tokenizer.save_pretrained(str(out / sub))
        folders[tower] = out / sub
    with open(out / SPEC_FILE, "w") as f:
        json.dump(
            {"spec": dataclasses.asdict(encoder.spec), "towers": names}, f, indent=2, sort_keys=True
        )
    return folders


def param_count(params: dict) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
