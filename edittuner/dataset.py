"""Raw folder -> dataset JSON, and reading a dataset JSON back as validated samples.

Raw layout (files pair by identical stem, any image extension):
    target/      the edited result                  -> "image"
    source/      first reference (required)         -> "edit_image"[0]
    source_2/    optional second reference          -> "edit_image"[1]
    source_3/    optional third reference           -> "edit_image"[2]
    ref_gt/      optional                           -> "ref_gt"
    mask/        optional edit mask (white = edit)  -> "back_mask"
Prompts: target/<stem>.txt, else prompts.jsonl ({"id": stem, "prompt": ...}) in the raw folder, else --prompt.
Text files must be UTF-8 (a BOM is fine); a prompt file in another encoding skips its sample (reason recorded).

Paths in a dataset JSON (``load_dataset``): relative ones resolve against the JSON's folder and may not leave it
(``..``) unless a data root is given; absolute ones are taken as written. With a data root (``root=`` or the
environment variable EDITTUNER_DATA_ROOT) every path, relative or absolute and after following symbolic links,
must lie inside that root.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import random
import sys
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

from tqdm import tqdm

from .atomic import write_json
from .errors import EditTunerError
from .images import IMAGE_EXTENSIONS, ImageTooLarge, check_aspect_ratio, probe_image

REFERENCE_ROLES = ("source", "source_2", "source_3")
ROLES = ("target",) + REFERENCE_ROLES + ("ref_gt", "mask")
ROW_FIELDS = {"id", "prompt", "image", "edit_image", "ref_gt", "back_mask", "width", "height"}


@dataclass(frozen=True)
class GenerateConfig:
    raw_dir: Path = field(metadata={"help": "folder with target/, source/ [source_2/ source_3/ ref_gt/ mask/]"})
    output: Path = field(metadata={"help": "dataset JSON to write"})
    prompt: str | None = field(default=None, metadata={
        "help": "one prompt for samples without a .txt or prompts.jsonl entry"})
    workers: int = field(default=1, metadata={"cli_default": max(1, min(8, os.cpu_count() or 1)),
                                              "help": "processes (default: cores, max 8)"})
    verify: bool = field(default=False, metadata={
        "action": "store_true", "help": "fully decode every image (slower; catches truncated files)"})
    min_size: int = field(default=64, metadata={
        "help": "skip images whose shorter side is below this (default 64)"})
    strict_size: bool = field(default=False, metadata={
        "action": "store_true", "help": "also require references and ref_gt to match the target size"})
    val_fraction: float = field(default=0.0, metadata={"help": "fraction held out to <output>_val.json (default 0)"})
    split_seed: int = field(default=0, metadata={"help": "seed of the train/val split (default 0)"})

    def __post_init__(self):
        if self.workers < 1:
            raise EditTunerError(f"--workers {self.workers}: must be at least 1")
        if self.min_size < 1:
            raise EditTunerError(f"--min_size {self.min_size}: must be at least 1")
        if not 0.0 <= self.val_fraction < 1.0:
            raise EditTunerError(f"--val_fraction {self.val_fraction}: must be in [0, 1)")
        if not Path(self.raw_dir).is_dir():
            raise EditTunerError(f"--raw_dir {self.raw_dir}: no such directory")
        if not (Path(self.raw_dir) / "target").is_dir() or not (Path(self.raw_dir) / "source").is_dir():
            raise EditTunerError(f"--raw_dir {self.raw_dir}: needs the sub-folders target/ and source/ "
                                 "(optional: source_2/, source_3/, ref_gt/, mask/)")


@dataclass
class GenerateReport:
    rows: int
    val_rows: int
    skipped: list[dict]
    output: Path
    val_output: Path | None
    skipped_output: Path
    val_note: str | None = None     # what became of an existing <name>_val.json when this run wrote none

    def summary(self) -> str:
        reasons = Counter(s["reason"].split(":")[0] for s in self.skipped)
        lines = [f"wrote {self.rows} samples to {self.output}"]
        if self.val_output:
            lines.append(f"wrote {self.val_rows} validation samples to {self.val_output}")
        if self.val_note:
            lines.append(self.val_note)
        lines.append(f"skipped {len(self.skipped)} samples (details in {self.skipped_output})")
        lines += [f"  {count:6d}  {reason}" for reason, count in sorted(reasons.items())]
        return "\n".join(lines)


def _index_folder(folder: Path) -> dict[str, list[Path]]:
    """Image files by stem. Symbolic links are listed whatever they point at (broken links and loops too), so
    that the probe reports them as skipped samples instead of their stems silently going missing."""
    by_stem: dict[str, list[Path]] = {}
    if folder.is_dir():
        with os.scandir(folder) as entries:
            for entry in entries:
                if os.path.splitext(entry.name)[1].lower() not in IMAGE_EXTENSIONS:
                    continue
                try:
                    listed = entry.is_symlink() or entry.is_file()
                except OSError:
                    listed = True
                if listed:
                    by_stem.setdefault(os.path.splitext(entry.name)[0], []).append(Path(entry.path))
    return by_stem


def _decode_text(data: bytes, path: Path) -> str:
    """UTF-8 (with or without BOM), or EditTunerError naming the file and the first bad byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise EditTunerError(f"{path}: not UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                             "re-save it as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)") from None


def _read_prompt_file(path: Path) -> tuple[str | None, str | None]:
    """(prompt, None) or (None, skip reason) for target/<stem>.txt."""
    try:
        return _decode_text(path.read_bytes(), path), None
    except EditTunerError as exc:
        return None, f"prompt not UTF-8: {exc}"
    except OSError as exc:
        return None, f"unreadable prompt: {path}: {exc.strerror or exc}"


def _read_prompts_jsonl(path: Path) -> dict[str, str]:
    prompts = {}
    if not path.is_file():
        return prompts
    try:
        lines = path.read_bytes().splitlines()
    except OSError as exc:
        raise EditTunerError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    for number, raw_line in enumerate(lines, 1):
        try:
            line = _decode_text(raw_line, path)
        except EditTunerError as exc:
            raise EditTunerError(f"{exc}".replace(f"{path}:", f"{path}, line {number}:", 1)) from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            prompts[str(record["id"])] = str(record["prompt"])
        except (ValueError, KeyError, TypeError):
            raise EditTunerError(f"{path}, line {number}: expected a JSON object with \"id\" and \"prompt\"") from None
    return prompts


def _check_sample(task: tuple) -> tuple[dict | None, str | None]:
    """Validate one sample's files (in a worker process). Returns (row, None) or (None, reason)."""
    stem, paths, prompt, prompt_problem, out_dir, verify, min_size, strict_size = task
    if "source" not in paths:
        return None, "missing partner: no source/ image with this stem"
    for role, candidates in paths.items():
        if len(candidates) > 1:
            return None, f"ambiguous: {role}/ has several files named {stem}.*"
    if prompt_problem:
        return None, prompt_problem
    if not prompt or not prompt.strip():
        return None, "empty prompt: no target/<stem>.txt, prompts.jsonl entry or --prompt"
    infos = {}
    for role, candidates in paths.items():
        try:
            infos[role] = probe_image(candidates[0], verify=verify)
        except ImageTooLarge as exc:
            return None, f"too large: {exc}"
        except EditTunerError as exc:
            return None, f"unreadable: {exc}"
    target = infos["target"]
    for role, info in infos.items():
        if min(info.width, info.height) < min_size:
            return None, f"too small: {role}/{paths[role][0].name} is {info.width}x{info.height} (< --min_size {min_size})"
        try:
            check_aspect_ratio(info.width, info.height, f"{role}/{paths[role][0].name}")
        except EditTunerError as exc:
            return None, f"extreme aspect ratio: {exc}"
    must_match = ["mask"] + (["ref_gt", *REFERENCE_ROLES] if strict_size else [])
    for role in must_match:
        if role in infos and (infos[role].width, infos[role].height) != (target.width, target.height):
            return None, (f"size mismatch: {role}/{paths[role][0].name} is {infos[role].width}x{infos[role].height}, "
                          f"target is {target.width}x{target.height}")
    rel = lambda role: _row_path(paths[role][0], out_dir) if role in paths else None  # noqa: E731
    row = {"id": stem, "prompt": prompt.strip(), "image": rel("target"),
           "edit_image": [rel(role) for role in REFERENCE_ROLES if role in paths],
           "ref_gt": rel("ref_gt"), "back_mask": rel("mask"), "width": target.width, "height": target.height}
    return row, None


def _row_path(path: Path, out_dir: Path) -> str:
    """How a row names a file: relative to the JSON's folder when the file lies inside it, else absolute
    (``load_dataset`` refuses relative paths that leave the JSON's folder unless given a data root)."""
    absolute = Path(os.path.realpath(path.parent)) / path.name   # the folder's real place; the file as named
    try:
        return absolute.relative_to(out_dir).as_posix()
    except ValueError:
        return str(absolute)


def _tasks(cfg: GenerateConfig, index: dict[str, dict[str, list[Path]]], prompts: dict[str, str], out_dir: Path):
    for stem in sorted(index["target"]):
        paths = {role: index[role][stem] for role in ROLES if stem in index[role]}
        txt = Path(cfg.raw_dir) / "target" / f"{stem}.txt"
        prompt, problem = _read_prompt_file(txt) if txt.is_file() else (prompts.get(stem, cfg.prompt), None)
        yield stem, paths, prompt, problem, out_dir, cfg.verify, cfg.min_size, cfg.strict_size


def generate_dataset_json(cfg: GenerateConfig, progress: bool = True) -> GenerateReport:
    raw = Path(cfg.raw_dir)
    output = Path(cfg.output).resolve()
    out_dir = output.parent
    index = {role: _index_folder(raw / role) for role in ROLES}
    prompts = _read_prompts_jsonl(raw / "prompts.jsonl")
    rows, skipped = [], []
    for stem in sorted(set().union(*(index[r] for r in ROLES[1:])) - set(index["target"])):
        skipped.append({"id": stem, "reason": "missing partner: no target/ image with this stem"})
    total = len(index["target"])
    tasks = _tasks(cfg, index, prompts, out_dir)
    bar = tqdm(total=total, desc="checking samples", unit="sample", disable=not progress)
    ctx = get_context("fork" if os.name == "posix" else "spawn")
    pool = ctx.Pool(cfg.workers) if cfg.workers > 1 else None
    try:
        # Large chunks: a header probe takes well under a millisecond, less than sending one task to a worker.
        chunksize = max(64, min(2048, total // (cfg.workers * 4) or 1))
        results = pool.imap(_check_sample, tasks, chunksize=chunksize) if pool else map(_check_sample, tasks)
        for stem, (row, reason) in zip(sorted(index["target"]), results):
            bar.update()
            if row is None:
                skipped.append({"id": stem, "reason": reason})
            else:
                rows.append(row)
    finally:
        bar.close()
        if pool:
            pool.close()
            pool.join()
    skipped.sort(key=lambda s: s["id"])

    val_rows: list[dict] = []
    if cfg.val_fraction > 0 and len(rows) > 1:
        order = list(range(len(rows)))
        random.Random(cfg.split_seed).shuffle(order)
        n_val = max(1, round(len(rows) * cfg.val_fraction))
        val_ids = set(order[:n_val])
        val_rows = [r for i, r in enumerate(rows) if i in val_ids]
        rows = [r for i, r in enumerate(rows) if i not in val_ids]
    write_json(output, rows)
    val_output, val_note = output.with_name(output.stem + "_val.json"), None
    if val_rows:
        write_json(val_output, val_rows)
    else:
        val_note, val_output = _settle_old_validation_set(val_output, rows, out_dir), None
    skipped_output = output.with_name(output.stem + "_skipped.json")
    write_json(skipped_output, skipped)
    return GenerateReport(len(rows), len(val_rows), skipped, output, val_output, skipped_output, val_note)


def _settle_old_validation_set(val_path: Path, rows: list[dict], out_dir: Path) -> str | None:
    """This run wrote no validation split; an existing ``<name>_val.json`` (which the launchers pass to phase 1)
    from an earlier split would make validation pairs training rows too. Remove it when any of its pairs is now a
    training row (same id or same target file); keep one whose pairs are all held out (made from other data).
    Returns the summary line, or None when there is no such file."""
    if not val_path.is_file():
        return None
    try:
        old = json.loads(val_path.read_bytes())
        old_keys = [(str(r.get("id") or Path(r["image"]).stem), os.path.realpath(out_dir / r["image"])) for r in old]
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return (f"note: {val_path} is not a dataset JSON the generator can read; the launchers would pass it to "
                "phase 1 as validation pairs: fix or remove it")
    ids = {r["id"] for r in rows}
    images = {os.path.realpath(out_dir / r["image"]) for r in rows}
    overlap = sum(1 for key, image in old_keys if key in ids or image in images)
    if not overlap:
        return f"kept {val_path}: none of its {len(old_keys)} validation pairs is a training row"
    val_path.unlink()
    return (f"removed the stale {val_path}: {overlap} of its {len(old_keys)} validation pairs are training rows now "
            "(this run has no --val_fraction split); pass --val_fraction to hold pairs out again")


# ----------------------------------------------------------------------------------------------------------------
# Reading a dataset JSON.

@dataclass(frozen=True)
class Sample:
    id: str
    prompt: str
    image: Path
    edit_images: tuple[Path, ...]
    mask: Path | None = None
    ref_gt: Path | None = None

    def files(self) -> list[Path]:
        return [self.image, *self.edit_images] + [p for p in (self.mask, self.ref_gt) if p is not None]


DATA_ROOT_ENV = "EDITTUNER_DATA_ROOT"
# DiffSynth-Studio's metadata files (its --dataset_metadata_path), read as they are: .csv with a header row and
# .jsonl with one object a line, besides a JSON list (ours, or DiffSynth's .json, the same shape).
METADATA_SUFFIXES = (".csv", ".jsonl")
DATASET_SUFFIXES = (".json",) + METADATA_SUFFIXES


def _resolve_row_path(path: Path, number: int, name: str, value: str, base: Path, root: Path | None,
                      base_given: bool = False) -> Path:
    """Where a row's file field points, refusing paths that escape the base folder (or the data root)."""
    where = f"{path}, row {number}: \"{name}\""
    if "\0" in value:
        raise EditTunerError(f"{where} contains a NUL character; fix the path")
    candidate = Path(value) if os.path.isabs(value) else base / value
    if root is None:
        if not os.path.isabs(value) and os.path.normpath(value).split(os.sep)[0] == os.pardir:
            raise EditTunerError(
                f"{where} path {value!r} leaves "
                + (f"--dataset_base_path {base}" if base_given else f"the dataset JSON's folder {base}")
                + f"; use a path inside it, an absolute path, or allow a wider tree with --data_root DIR "
                f"(or {DATA_ROOT_ENV}=DIR)")
    else:
        try:
            real = candidate.resolve(strict=True)
        except FileNotFoundError:
            real = Path(os.path.realpath(candidate))
        except (OSError, RuntimeError):   # a symlink loop (RuntimeError before Python 3.13)
            raise EditTunerError(f"{where} file {candidate} is a symbolic link loop; point it at a real file "
                                 "or regenerate the dataset JSON") from None
        if not real.is_relative_to(root):
            raise EditTunerError(f"{where} path {value!r} resolves to {real}, outside the data root {root}; "
                                 f"fix the row or pass --data_root (or {DATA_ROOT_ENV}) naming a folder that contains it")
    try:
        candidate.stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise EditTunerError(f"{where} file {candidate} is a symbolic link loop; point it at a real file "
                                 "or regenerate the dataset JSON") from None
        if candidate.is_symlink():
            raise EditTunerError(f"{where} file {candidate} is a broken symbolic link; fix it or regenerate "
                                 "the dataset JSON") from None
        raise EditTunerError(f"{where} file {candidate} does not exist; fix the path or regenerate the dataset "
                             "JSON") from None
    if not candidate.is_file():
        raise EditTunerError(f"{where} {candidate} is not a file; fix the path or regenerate the dataset JSON")
    return candidate


def _csv_rows(path: Path, data: bytes) -> list:
    """A DiffSynth metadata.csv: a header row naming the columns, one sample a row; an empty cell is no value. An
    ``edit_image`` cell holds one path, or a JSON list of paths (several references)."""
    reader = csv.DictReader(io.StringIO(_decode_text(data, path), newline=""))
    rows = []
    try:
        for number, record in enumerate(reader):
            if None in record:
                raise EditTunerError(f"{path}, row {number}: more cells than the header has columns; quote cells "
                                     "that hold commas")
            row = {k: v for k, v in record.items() if v not in (None, "")}
            refs = row.get("edit_image")
            if isinstance(refs, str) and refs.lstrip().startswith("["):
                try:
                    row["edit_image"] = json.loads(refs)
                except ValueError:
                    raise EditTunerError(f"{path}, row {number}: \"edit_image\" {refs!r} is neither a path nor a "
                                         "JSON list of paths") from None
            for size in ("width", "height"):
                if size in row:
                    try:
                        row[size] = int(row[size])
                    except ValueError:
                        raise EditTunerError(f"{path}, row {number}: \"{size}\" must be a whole number, got "
                                             f"{row[size]!r}") from None
            rows.append(row)
    except csv.Error as exc:
        raise EditTunerError(f"dataset file {path}: not a valid CSV file ({exc})") from None
    return rows


def _jsonl_rows(path: Path, data: bytes) -> list:
    rows = []
    for number, line in enumerate(l for l in _decode_text(data, path).splitlines() if l.strip()):
        try:
            rows.append(json.loads(line))
        except (ValueError, RecursionError) as exc:
            raise EditTunerError(f"{path}, row {number}: not valid JSON ({exc}); each line holds one JSON "
                                 "object") from None
    return rows


def _read_rows(path: Path) -> list:
    """The rows of a dataset file, by its suffix: .csv, .jsonl, else a JSON list."""
    if not path.is_file():
        kind = "dataset JSON" if path.suffix.lower() not in METADATA_SUFFIXES else "dataset file"
        raise EditTunerError(f"{kind} {path}: no such file; make one with `edittuner dataset --raw_dir ...`")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise EditTunerError(f"dataset JSON {path}: cannot read it ({exc.strerror or exc})") from None
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _csv_rows(path, data)
    if suffix == ".jsonl":
        return _jsonl_rows(path, data)
    try:
        return json.loads(data)   # UTF-8 (BOM or not), UTF-16 and UTF-32 are detected from the bytes
    except UnicodeDecodeError as exc:
        raise EditTunerError(f"dataset JSON {path}: not UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                             "re-save it as UTF-8") from None
    except (ValueError, RecursionError) as exc:
        raise EditTunerError(f"dataset JSON {path}: not valid JSON ({exc})") from None


def _check_types(path: Path, number: int, row: dict) -> None:
    """Known fields of the wrong type are errors (unknown fields are only ignored)."""
    where = f"{path}, row {number}"
    for required in ("prompt", "image", "edit_image"):
        if required not in row:
            raise EditTunerError(f"{where}: missing field \"{required}\"")
    if not isinstance(row["prompt"], str):
        raise EditTunerError(f"{where}: \"prompt\" must be text, got {type(row['prompt']).__name__}")
    if "id" in row and (isinstance(row["id"], bool) or not isinstance(row["id"], (str, int, type(None)))):
        raise EditTunerError(f"{where}: \"id\" must be text or a number, got {type(row['id']).__name__}")
    for size in ("width", "height"):
        if size in row and (isinstance(row[size], bool) or not isinstance(row[size], (int, type(None)))):
            raise EditTunerError(f"{where}: \"{size}\" must be a whole number, got {row[size]!r}")
    for name in ("back_mask", "ref_gt"):
        if row.get(name) is not None and not isinstance(row[name], str):
            raise EditTunerError(f"{where}: \"{name}\" must be a file path or null, got {row[name]!r}")


def _warn_unknown(path: Path, unknown: dict[str, int]) -> None:
    """One warning for the whole file: each unknown field with the first row that has it."""
    listed = ", ".join(f"\"{name}\" (first in row {row})" for name, row in sorted(unknown.items(), key=lambda i: i[1]))
    print(f"warning: {path}: ignoring unknown field(s) {listed}; the fields read are {', '.join(sorted(ROW_FIELDS))}",
          file=sys.stderr, flush=True)


def _sample_id(row: dict, value: str, image: Path, seen: dict) -> str:
    """The row's id, else its image's stem, else (that stem taken: DiffSynth data often reuses file names across
    folders) the image's path as written without its suffix."""
    if row.get("id") not in (None, ""):
        return str(row["id"])
    stem = image.stem
    if stem in seen and not os.path.isabs(value):
        return Path(value).with_suffix("").as_posix()
    return stem


def load_dataset(path: str | os.PathLike, root: str | os.PathLike | None = None,
                 base_path: str | os.PathLike | None = None, warn: bool = True) -> list[Sample]:
    """Read and validate a dataset file: our dataset JSON, or DiffSynth-Studio's metadata (.csv, .jsonl, .json with
    ``image``, ``prompt``, ``edit_image``: one path or a list).

    Relative paths resolve against ``base_path`` (default: the file's folder) and may not leave it; absolute paths
    are taken as written. With ``root`` (default: the environment variable EDITTUNER_DATA_ROOT) every path, after
    following symbolic links, must lie inside ``root``, and relative paths may use ``..`` as long as they stay
    inside it. Unknown fields are ignored, with one warning on stderr (``warn``) naming them.
    """
    path = Path(path)
    if root is None and os.environ.get(DATA_ROOT_ENV):
        root = os.environ[DATA_ROOT_ENV]
    if root is not None:
        if not Path(root).is_dir():
            raise EditTunerError(f"data root {root} (--data_root / {DATA_ROOT_ENV}): no such directory")
        root = Path(root).resolve()
    if base_path is not None and not Path(base_path).is_dir():
        raise EditTunerError(f"--dataset_base_path {base_path}: no such directory")
    rows = _read_rows(path)
    if not isinstance(rows, list) or not rows:
        raise EditTunerError(f"dataset JSON {path}: expected a non-empty list of samples")
    base = Path(base_path) if base_path is not None else path.parent
    samples, seen, unknown = [], {}, {}

    def file_field(number, name, value):
        if not isinstance(value, str) or not value:
            raise EditTunerError(f"{path}, row {number}: \"{name}\" must be a file path, got {value!r}")
        return _resolve_row_path(path, number, name, value, base, root, base_path is not None)

    for number, row in enumerate(rows):
        if not isinstance(row, dict):
            raise EditTunerError(f"{path}, row {number}: expected a JSON object, got {type(row).__name__}")
        for name in set(row) - ROW_FIELDS:
            unknown.setdefault(name, number)
        _check_types(path, number, row)
        prompt = row["prompt"]
        if not prompt.strip():
            raise EditTunerError(f"{path}, row {number}: empty prompt; write the edit instruction in \"prompt\"")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:
            raise EditTunerError(f"{path}, row {number}: the prompt holds an invalid character (a lone surrogate "
                                 "such as \\ud800); fix the text") from None
        edits = row["edit_image"]
        edits = [edits] if isinstance(edits, str) else edits
        if not isinstance(edits, list) or not 1 <= len(edits) <= 3:
            raise EditTunerError(f"{path}, row {number}: \"edit_image\" must list 1 to 3 reference images")
        image = file_field(number, "image", row["image"])
        sample_id = _sample_id(row, row["image"], image, seen)
        try:
            sample_id.encode("utf-8")
        except UnicodeEncodeError:
            raise EditTunerError(f"{path}, row {number}: the id {sample_id!r} holds an invalid character; "
                                 "fix it") from None
        if sample_id in seen:
            raise EditTunerError(f"{path}, rows {seen[sample_id]} and {number}: duplicate sample id {sample_id!r}; "
                                 "give each row a unique \"id\"")
        seen[sample_id] = number
        samples.append(Sample(
            id=sample_id, prompt=prompt.strip(), image=image,
            edit_images=tuple(file_field(number, f"edit_image[{i}]", e) for i, e in enumerate(edits)),
            mask=file_field(number, "back_mask", row["back_mask"]) if row.get("back_mask") else None,
            ref_gt=file_field(number, "ref_gt", row["ref_gt"]) if row.get("ref_gt") else None))
    if unknown and warn:
        _warn_unknown(path, unknown)
    return samples
