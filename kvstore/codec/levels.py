"""Named compression levels: ``raw`` through near-lossless to aggressive.

A level is stored in the object header's ``codec_level`` byte (kvq levels 1..5; raw
is codec 0). Without a calibration table each kvq level uses one bin count for all
key sections and one for all value sections (``default_bins``); a calibration table
(``kvstore.codec.calibrate``) replaces those by per-(layer group, K|V) bin counts
chosen for the model. Either way the bin counts travel in the object, so decoding
never needs the table.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvstore.errors import InvalidArgument


@dataclass(frozen=True, slots=True)
class Level:
    name: str  # public name, e.g. "balanced"
    level_id: int  # header codec_level byte (0 for raw)
    key_bins: int  # key bins per channel without a calibration table
    value_bins: int  # value bins per token without a calibration table (odd)
    target_kl: float  # calibration target: predicted mean next-token KL divergence (nats)
    description: str


_LEVELS = (
    Level("raw", 0, 0, 0, 0.0, "fp16/bf16 bytes, bit-exact"),
    Level("near-lossless", 1, 47, 23, 0.0008, "about 4.4 bits/element calibrated, ppl +0.1% mean"),
    Level("high", 2, 23, 11, 0.004, "about 3.6 bits/element, ppl within ~1%"),
    Level("balanced", 3, 15, 9, 0.0095, "about 2.75 bits/element calibrated, ppl within ~1.5%"),
    Level("compact", 4, 11, 7, 0.02, "about 2.6 bits/element, ppl +3%"),
    Level("aggressive", 5, 7, 5, 0.035, "about 2.3 bits/element, visible quality loss"),
)

LEVELS: dict[str, Level] = {lv.name: lv for lv in _LEVELS}
DEFAULT_LEVEL = "balanced"
_BY_ID = {lv.level_id: lv for lv in _LEVELS if lv.level_id}


def level_by_name(name: str) -> Level:
    try:
        return LEVELS[name]
    except KeyError:
        raise InvalidArgument(f"unknown codec level {name!r}; known: {list(LEVELS)}") from None


def level_by_id(level_id: int) -> Level | None:
    """The kvq level with this header byte, or None if unknown."""
    return _BY_ID.get(level_id)
