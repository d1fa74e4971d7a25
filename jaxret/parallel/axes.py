"""The mesh's axis names and the partition spec every layer uses, named once."""

from __future__ import annotations

from jax.sharding import PartitionSpec

DATA_AXIS = "data"  # batch rows, corpus rows and FSDP weight shards are split over it
MODEL_AXIS = "model"  # tensor-parallel weights (Megatron-style) are split over it
DATA = PartitionSpec(DATA_AXIS)  # a leading dimension split over the data axis
