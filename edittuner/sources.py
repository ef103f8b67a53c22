"""Several dataset sources in one run: the datasets file (``--datasets``, YAML or JSON) and what phase 1 records of
it for phase 2 (``sources.json`` in the cache folder). Light (no torch), like dataset.py.

A datasets file lists sources, each a dataset JSON, a DiffSynth-Studio metadata file (.csv / .jsonl / .json) or a
raw folder (target/, source/, ...; made into ``<cache>/sources/<name>/dataset.json`` by the generator)::

    sources:
      - path: portraits/dataset.json      # relative paths: from the datasets file's folder
        repeats: 2                         # its samples twice per epoch (default 1) ...
      - path: diffsynth/metadata.csv
        base_path: diffsynth               # DiffSynth's --dataset_base_path (default: the file's folder)
        max_pixels: 589824                 # its own pixel budget (default: --max_pixels)
        reference_size: target             # references resized to the target's size (default: --reference_size)
      - path: raw_folder
        prompt: "make it blue"             # raw folders: the prompt of samples without one

Either every source gives ``repeats`` (whole numbers; default 1) or every source gives ``weight`` (its share of
each epoch's samples, which holds as many samples as all sources together). Each source has its own cache in
``<cache_dir>/sources/<name>`` (name: ``name``, else <folder>-<file stem>, or a raw folder's name).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .errors import EditTunerError
from .images import REFERENCE_SIZES, ResizeConfig

SOURCES_FILE = "sources.json"    # in the cache folder: the sources phase 1 encoded, read by phase 2
SOURCES_SUBDIR = "sources"       # <cache_dir>/sources/<name>: one cache per source
SOURCE_KEYS = ("name", "path", "base_path", "repeats", "weight", "max_pixels", "reference_size", "prompt")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class Source:
    name: str
    path: Path
    base_path: Path | None = None
    repeats: int | None = None
    weight: float | None = None
    max_pixels: int | None = None
    reference_size: str | None = None
    prompt: str | None = None

    @property
    def is_raw(self) -> bool:
        return self.path.is_dir()

    def resize(self, run: ResizeConfig) -> ResizeConfig:
        """The run's resize settings with this source's own budget and reference rule."""
        changes = {k: v for k, v in (("max_pixels", self.max_pixels), ("reference_size", self.reference_size))
                   if v is not None}
        return replace(run, **changes) if changes else run

    def as_json(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items() if v is not None}


def _load(path: Path):
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise EditTunerError(f"--datasets {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EditTunerError(f"--datasets {path}: cannot read it as UTF-8 text ({exc})") from None
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except ValueError as exc:
            raise EditTunerError(f"--datasets {path}: not valid JSON ({exc})") from None
    import yaml   # accelerate's dependency, as for its configs
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise EditTunerError(f"--datasets {path}: not valid YAML ({exc})") from None


def _number(where: str, key: str, value, kind: type, minimum: float):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)) \
            or not math.isfinite(value) or value < minimum:
        kind_name = "a whole number" if kind is int else "a number"
        raise EditTunerError(f"{where}: \"{key}\" must be {kind_name} >= {minimum:g}, got {value!r}")
    return kind(value)


def _source(path: Path, number: int, entry) -> Source:
    where = f"--datasets {path}, source {number}"
    if isinstance(entry, str):
        entry = {"path": entry}
    if not isinstance(entry, dict) or "path" not in entry:
        raise EditTunerError(f"{where}: expected a mapping with at least \"path\" (a dataset file or raw folder)")
    unknown = sorted(set(entry) - set(SOURCE_KEYS))
    if unknown:
        raise EditTunerError(f"{where}: unknown key(s) {unknown}; a source may give {', '.join(SOURCE_KEYS)}")
    folder = path.parent
    where_path = (folder / str(entry["path"])).expanduser()
    if not where_path.exists():
        raise EditTunerError(f"{where}: \"path\" {where_path}: no such file or folder")
    # Default names like the launchers' cache folders: <folder>-<file stem> (metadata.csv is a common file name).
    name = str(entry.get("name") or (f"{where_path.parent.name}-{where_path.stem}" if where_path.is_file()
                                     else where_path.name))
    if not _NAME.fullmatch(name):
        raise EditTunerError(f"{where}: name {name!r} must be letters, digits, '.', '_' or '-' (it names the "
                             "source's cache folder); give the source a \"name\"")
    base = entry.get("base_path")
    if base is not None and not (folder / str(base)).is_dir():
        raise EditTunerError(f"{where}: \"base_path\" {folder / str(base)}: no such folder")
    reference = entry.get("reference_size")
    if reference is not None and reference not in REFERENCE_SIZES:
        raise EditTunerError(f"{where}: \"reference_size\" {reference!r}: choose {' or '.join(REFERENCE_SIZES)}")
    source = Source(
        name=name, path=where_path, base_path=folder / str(base) if base is not None else None,
        repeats=_number(where, "repeats", entry["repeats"], int, 1) if "repeats" in entry else None,
        weight=_number(where, "weight", entry["weight"], float, 0) if "weight" in entry else None,
        max_pixels=_number(where, "max_pixels", entry["max_pixels"], int, 1) if "max_pixels" in entry else None,
        reference_size=reference, prompt=str(entry["prompt"]) if entry.get("prompt") is not None else None)
    if source.weight == 0:
        raise EditTunerError(f"{where}: \"weight\" 0 would never draw this source; remove it from the file")
    if source.is_raw and base is not None:
        raise EditTunerError(f"{where}: \"base_path\" is for metadata files; {where_path} is a raw folder")
    return source


def read_datasets_file(path: str | Path, run_resize: ResizeConfig | None = None) -> list[Source]:
    """The sources of a datasets file, checked (each source's resize settings too, against ``run_resize``)."""
    path = Path(path)
    data = _load(path)
    entries = data.get("sources") if isinstance(data, dict) else data
    if isinstance(data, dict) and set(data) - {"sources"}:
        raise EditTunerError(f"--datasets {path}: unknown top-level key(s) {sorted(set(data) - {'sources'})}; "
                             "list the sources under \"sources\"")
    if not isinstance(entries, list) or not entries:
        raise EditTunerError(f"--datasets {path}: expected a non-empty list of sources under \"sources\"")
    sources = [_source(path, number, entry) for number, entry in enumerate(entries)]
    names = [s.name for s in sources]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise EditTunerError(f"--datasets {path}: several sources are named {twice}; give each a unique \"name\"")
    weighted = [s.name for s in sources if s.weight is not None]
    if weighted and (len(weighted) != len(sources) or any(s.repeats is not None for s in sources)):
        raise EditTunerError(f"--datasets {path}: give every source a \"weight\" (shares of each epoch) or none "
                             f"(\"repeats\", default 1); sources with a weight: {weighted}")
    if run_resize is not None:
        for number, source in enumerate(sources):
            try:
                source.resize(run_resize)
            except EditTunerError as exc:
                raise EditTunerError(f"--datasets {path}, source {number} ({source.name}): {exc}") from None
    return sources


def per_epoch(sources: list[dict], sizes: list[int]) -> list[int]:
    """Slots of each source in one epoch of the mix: repeats x its size, or its weight's share of all samples
    (at least one slot)."""
    if all(s.get("weight") is None for s in sources):
        return [(s.get("repeats") or 1) * n for s, n in zip(sources, sizes)]
    total, weights = sum(sizes), [s["weight"] for s in sources]
    return [max(1, round(total * w / sum(weights))) for w in weights]
