"""Calibration tables: per-(layer group, K|V) bin counts of every kvq level, per model.

``kvstore calibrate`` runs the model on several samples of text and

1. records the RMS post-RoPE query component every key channel meets (summed over
   the query heads sharing the kv head): the encoder gives key channel c a step
   proportional to 1 / weight[c] (section.py), since a key error reaches the logits
   multiplied by the query. On SmolLM2 this cut the KL of quantised keys ~4x at
   equal bits (the query RMS of a layer's channels spans ~10x, and the widest key
   channels tend to meet the largest queries, so equal steps per range were the
   wrong way round);
2. measures how much each layer group's keys and values (quantised that way) hurt
   the next-token distribution at REFERENCE_BINS (KL divergence against the exact
   cache, averaged over the samples), and allocates bins greedily where they buy
   the most KL per bit until each level's KL target is met (KL ∝ step**2);
3. measures the KL of every level's whole allocation on the samples and, where it
   misses the target, tightens that level's target by the miss and allocates again
   once (groups' errors are not quite additive and step**2 is only approximate).

A table is a JSON file, ``<user data dir>/kvstore/calibration/<model>-<id>.json``:

    {"format": "kvq-calibration/2", "model": "smollm2-135m", "table_id": "<16 hex>",
     "layout": {"num_layers": 30, "num_kv_heads": 3, "head_dim": 64},
     "group_layers": 5, "sensitivity": {"k": [...], "v": [...]},
     "key_weights": [[heads * head_dim weights] per layer],
     "levels": {"balanced": {"k": [bins per group], "v": [...]}, ...}}

Version 1 tables (no key weights) are refused as Corrupt: re-run ``kvstore calibrate``.

``table_id`` is the xxh64 of the canonical JSON of everything else; objects record
it in their meta area. Decoding never needs the table (bins travel per section).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import platformdirs
import xxhash

from kvstore.codec.levels import LEVELS
from kvstore.errors import Corrupt, InvalidArgument, NotFound
from kvstore.layout import KVLayout

log = logging.getLogger(__name__)

TABLE_FORMAT = "kvq-calibration/2"
KEY_LADDER = (5, 7, 9, 11, 13, 15, 17, 19, 23, 27, 31, 39, 47, 55, 63, 79, 95, 127)
VALUE_LADDER = (3, 5, 7, 9, 11, 13, 15, 19, 23, 27, 31, 39, 47, 55, 63, 79, 95, 127)
REFERENCE_BINS = (7, 5)  # (keys, values) bins at which sensitivity is measured
# Sample text offsets (chars into the sample text): spread over the text, and clear
# of the codec benchmark's prompts (bench/bench_codec.py PROMPTS).
SAMPLE_OFFSETS = (30_000, 60_000, 110_000, 200_000)


_WEIGHT_ARRAYS: dict[int, np.ndarray] = {}  # table_id -> key weights [layers, channels]


@dataclass(frozen=True, slots=True)
class CalibrationTable:
    model: str  # model name the table was measured on
    num_layers: int  # layout the table applies to
    num_kv_heads: int
    head_dim: int
    group_layers: int  # consecutive layers sharing bins
    sensitivity: dict[str, list[float]]  # "k"/"v" -> KL (nats) per group at REFERENCE_BINS
    key_weights: list[list[float]]  # per layer: RMS query per key channel (geo. mean 1)
    levels: dict[str, dict[str, list[int]]]  # level -> "k"/"v" -> bins per group
    table_id: int  # xxh64 of the canonical JSON body

    def key_weights_of(self, layer: int) -> np.ndarray:
        """Key channel weights ``[heads * head_dim]`` of a layer (see section.py)."""
        arrays = _WEIGHT_ARRAYS.get(self.table_id)
        if arrays is None:  # converted once per table: encoders ask per section
            arrays = _WEIGHT_ARRAYS[self.table_id] = np.asarray(self.key_weights, np.float64)
        return arrays[layer]

    def bins(self, level: str, layer: int, kv_index: int) -> int:
        """Bins for a (level, layer, K=0|V=1)."""
        if level not in self.levels:
            raise InvalidArgument(f"calibration table {self.table_id:016x} has no level {level!r}")
        return self.levels[level]["kv"[kv_index]][layer // self.group_layers]

    def check_layout(self, layout: KVLayout) -> None:
        mine = (self.num_layers, self.num_kv_heads, self.head_dim)
        theirs = (layout.num_layers, layout.num_kv_heads, layout.head_dim)
        if mine != theirs:
            raise InvalidArgument(f"calibration table for {self.model} has layers/heads/dim "
                                  f"{mine}, layout has {theirs}")

    def body(self) -> dict:
        return {
            "format": TABLE_FORMAT, "model": self.model,
            "layout": {"num_layers": self.num_layers, "num_kv_heads": self.num_kv_heads,
                       "head_dim": self.head_dim},
            "group_layers": self.group_layers, "sensitivity": self.sensitivity,
            "key_weights": self.key_weights, "levels": self.levels,
        }


def _id_of(body: dict) -> int:
    return xxhash.xxh64(json.dumps(body, sort_keys=True).encode()).intdigest()


def normalise_weights(rms: np.ndarray) -> list[list[float]]:
    """Per-layer key weights from RMS queries ``[layers, channels]``: floored at 1% of
    the layer's largest (a channel no sample's query used still gets a finite step),
    geometric mean 1, four significant digits."""
    w = np.maximum(rms, 0.01 * rms.max(axis=1, keepdims=True))
    w = w / np.exp(np.log(w).mean(axis=1, keepdims=True))
    return [[float(f"{v:.4g}") for v in row] for row in w]


def make_table(model: str, layout: KVLayout, group_layers: int,
               sensitivity: dict[str, list[float]], key_weights: list[list[float]],
               targets: dict[str, float] | None = None) -> CalibrationTable:
    """Allocate bins for every kvq level from measured group sensitivities.

    ``targets`` overrides levels' KL targets (the second pass of calibration)."""
    targets = targets or {}
    levels = {lv.name: allocate_bins(sensitivity, targets.get(lv.name, lv.target_kl),
                                     group_layers, layout.num_layers)
              for lv in LEVELS.values() if lv.level_id}
    table = CalibrationTable(model, layout.num_layers, layout.num_kv_heads, layout.head_dim,
                             group_layers, sensitivity, key_weights, levels, 0)
    return CalibrationTable(**{**{f: getattr(table, f) for f in table.__slots__},
                               "table_id": _id_of(table.body())})


def make_table_from_bins(model: str, layout: KVLayout, group_layers: int,
                         key_weights: list[list[float]],
                         levels: dict[str, dict[str, list[int]]]) -> CalibrationTable:
    """A table with given bins (no sensitivity measured: all zeros), e.g. the
    statistics-only tables of ``kvstore.codec.autocal``."""
    groups = -(-layout.num_layers // group_layers)
    sensitivity = {"k": [0.0] * groups, "v": [0.0] * groups}
    table = CalibrationTable(model, layout.num_layers, layout.num_kv_heads, layout.head_dim,
                             group_layers, sensitivity, key_weights, levels, 0)
    return CalibrationTable(**{**{f: getattr(table, f) for f in table.__slots__},
                               "table_id": _id_of(table.body())})


def predicted_kl(sens: float, bins: int, reference: int) -> float:
    """KL of a group at ``bins``: quantisation noise power scales with step**2."""
    return sens * ((reference - 1) / (bins - 1)) ** 2


def allocate_bins(sensitivity: dict[str, list[float]], target_kl: float, group_layers: int,
                  num_layers: int) -> dict[str, list[int]]:
    """Greedy: raise the bins of the group buying most KL per bit until the target holds."""
    ladders = {"k": KEY_LADDER, "v": VALUE_LADDER}
    refs = {"k": REFERENCE_BINS[0], "v": REFERENCE_BINS[1]}
    groups = len(sensitivity["k"])
    sizes = [min(group_layers, num_layers - g * group_layers) for g in range(groups)]
    rung = {kv: [0] * groups for kv in "kv"}

    def kl(kv: str, g: int, r: int) -> float:
        return predicted_kl(max(sensitivity[kv][g], 0.0), ladders[kv][r], refs[kv])

    total = sum(kl(kv, g, 0) for kv in "kv" for g in range(groups))
    while total > target_kl:
        best, best_gain = None, 0.0
        for kv in "kv":
            for g in range(groups):
                r = rung[kv][g]
                if r + 1 >= len(ladders[kv]):
                    continue
                bits = sizes[g] * math.log2((ladders[kv][r + 1] - 1) / (ladders[kv][r] - 1))
                gain = (kl(kv, g, r) - kl(kv, g, r + 1)) / bits
                if best is None or gain > best_gain:
                    best, best_gain = (kv, g), gain
        if best is None:
            break
        kv, g = best
        total -= kl(kv, g, rung[kv][g]) - kl(kv, g, rung[kv][g] + 1)
        rung[kv][g] += 1
    return {kv: [ladders[kv][r] for r in rung[kv]] for kv in "kv"}


def default_dir() -> Path:
    return Path(platformdirs.user_data_dir("kvstore")) / "calibration"


def save_table(table: CalibrationTable, path: Path | None = None) -> Path:
    """Write the table as JSON (atomically); returns its path."""
    path = path or default_dir() / f"{table.model}-{table.table_id:016x}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**table.body(), "table_id": f"{table.table_id:016x}"}, indent=1))
    tmp.replace(path)
    return path


def load_table(ref: str | Path) -> CalibrationTable:
    """Load a table from a path, or by its 16-hex-digit id from the default directory."""
    path = Path(ref)
    if not path.exists():
        matches = sorted(default_dir().glob(f"*-{str(ref).lower()}.json"))
        if not matches:
            raise NotFound(f"no calibration table {ref!r} (looked in {default_dir()})")
        path = matches[0]
    try:
        doc = json.loads(path.read_text())
        lay = doc["layout"]
        if doc.get("format") != TABLE_FORMAT:
            raise Corrupt(f"calibration table {path} has format {doc.get('format')!r}, "
                          f"expected {TABLE_FORMAT!r}: re-run `kvstore calibrate`")
        table = CalibrationTable(doc["model"], lay["num_layers"], lay["num_kv_heads"],
                                 lay["head_dim"], doc["group_layers"], doc["sensitivity"],
                                 doc["key_weights"], doc["levels"], int(doc["table_id"], 16))
        weights = np.asarray(table.key_weights, dtype=np.float64)
    except (ValueError, KeyError, TypeError) as e:
        raise Corrupt(f"calibration table {path} is malformed: {e}") from e
    if _id_of(table.body()) != table.table_id:
        raise Corrupt(f"calibration table {path}: id does not match contents")
    if (weights.shape != (table.num_layers, table.num_kv_heads * table.head_dim)
            or not np.all(weights > 0) or not np.all(np.isfinite(weights))):
        channels = table.num_kv_heads * table.head_dim
        raise Corrupt(f"calibration table {path}: key weights are not "
                      f"{table.num_layers} x {channels} positive numbers")
    return table
