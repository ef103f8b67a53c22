"""`edittuner check`: what phase 1 and phase 2 would refuse before their first step, checked at once, before phase
1 starts (the launchers run it first), with nothing loaded and nothing left behind.

The light checks (flags, JSON files, the accelerate config, the model and cache folders) come first, so that most
bad values fail in well under a second; phase 2's run folder, the model files and the machine's levers come last,
because checking them imports torch (and the family's model check, the engine).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

from .atomic import FolderLock, check_output_dir
from .configs import PrecomputeConfig, TrainConfig
from .dataset import GenerateConfig, load_dataset
from .errors import EditTunerError, about
from .launch import deepspeed_config_file
from .models import ModelSource
from .sources import read_datasets_file


def check_model_folders(model: ModelSource) -> None:
    """Every folder the model options name exists: a moment's check, before the family's check of the files in
    them (which imports the engine)."""
    for f in fields(model):
        folder = getattr(model, f.name)
        if (f.name.endswith("_dir") and folder and not (f.name == "model_dir" and model.is_tiny)
                and not Path(folder).is_dir()):
            raise EditTunerError(f"--{f.name} {folder}: no such directory ({f.metadata['help']})")


@contextmanager
def _probed(folder: Path):
    """A folder the check made is removed again, so a dry check leaves nothing behind."""
    created = not folder.exists()
    try:
        yield
    finally:
        if created:
            FolderLock.remove_empty(folder)


def check_cache_folder(cache_dir: Path) -> None:
    """Phase 1 can write the cache folder, and no other phase 1 is writing it."""
    with _probed(Path(cache_dir)):
        check_output_dir(cache_dir, "--cache_dir")
        with about("--cache_dir"), FolderLock(cache_dir, "phase 1 (precompute)"):
            pass


def check_machines(num_processes: int, num_machines: int, machine_rank: int, main_process_ip: str | None,
                   main_process_port: int | None) -> None:
    """Several machines: accelerate starts num_processes / num_machines processes on each, all meeting the main
    machine's address; a rank, count or port that cannot work is refused here rather than by a rendezvous that
    waits forever."""
    if num_machines == 1:
        return
    if num_processes % num_machines:
        raise EditTunerError(f"--num_processes {num_processes} over --num_machines {num_machines}: the process count "
                             "is over all machines together and must split evenly (e.g. 8 GPUs x 2 machines = 16)")
    if not 0 <= machine_rank < num_machines:
        raise EditTunerError(f"--machine_rank {machine_rank}: must be 0 (the main machine) to {num_machines - 1}")
    if not main_process_ip:
        raise EditTunerError(f"--main_process_ip: several machines (--num_machines {num_machines}) need the main "
                             "machine's address (the launchers' MAIN_PROCESS_IP), the same on every machine")
    if main_process_port is not None and not 1 <= main_process_port <= 65535:
        raise EditTunerError(f"--main_process_port {main_process_port}: must be a port number from 1 to 65535")


def check_sub_stream_target(phase_2: TrainConfig, rows: list, dataset_json) -> None:
    """LBM's sub stream bridging to ref_gt needs rows that have one (phase 2 counts the rest as falling back to
    the target): a dataset without any is refused before phase 1 encodes it."""
    if phase_2.objective == "lbm" and phase_2.bridge.sub_stream_target == "ref_gt" and \
            not any(row.ref_gt for row in rows):
        raise EditTunerError(
            f"--sub_stream_target ref_gt: no row of {dataset_json} has a \"ref_gt\" image, so the sub stream would "
            "bridge to the target everywhere; put the ref_gt images in the raw folder's ref_gt/ (paired by stem) and "
            "regenerate the dataset JSON, or use --sub_stream_target target")


def check_datasets(phase_1: PrecomputeConfig) -> list:
    """The rows of phase 1's dataset file, or of every --datasets source (a raw folder: that it is one; phase 1
    makes its dataset JSON)."""
    if phase_1.datasets is None:
        with about("--dataset_json"):
            return load_dataset(phase_1.dataset_json, root=phase_1.data_root, base_path=phase_1.dataset_base_path)
    rows = []
    with about("--datasets"):
        for source in read_datasets_file(phase_1.datasets, phase_1.resize):
            if source.is_raw:
                GenerateConfig(raw_dir=source.path, output=Path(phase_1.cache_dir) / "unused.json")
            else:
                rows += load_dataset(source.path, root=phase_1.data_root, base_path=source.base_path)
    return rows


def check_launch(phase_1: PrecomputeConfig, phase_2: TrainConfig | None,
                 accelerate_config: str | os.PathLike | None = None) -> None:
    """Phase 1's refusals (dataset and validation JSONs, cache folder, encoder files) and phase 2's
    (``trainer.check_train``), phase 2 under the DeepSpeed config ``accelerate_config`` names, as its workers
    will run."""
    with about("--accelerate_config"):
        deepspeed = deepspeed_config_file(accelerate_config) if accelerate_config else None
    rows = check_datasets(phase_1)
    if phase_2 is not None:
        check_sub_stream_target(phase_2, rows, phase_1.dataset_json or phase_1.datasets)
    if phase_1.validation_json is not None:
        with about("--validation_json"):
            validation = load_dataset(phase_1.validation_json, root=phase_1.data_root)
    for model in (phase_1.model, phase_2.model) if phase_2 else (phase_1.model,):
        check_model_folders(model)
    check_cache_folder(phase_1.cache_dir)
    if phase_2 is not None and phase_2.cfg_dropout > 0 and not phase_1.negative_prompts:
        raise EditTunerError(f"--cfg_dropout {phase_2.cfg_dropout} trains on each sample's negative prompt, which phase 1 "
                             "encodes only with --negative_prompts on: add it to phase 1's flags (the launchers do "
                             "when CFG_DROPOUT is set)")

    from .cache import check_validation_overlap   # torch from here on
    if phase_1.validation_json is not None:
        check_validation_overlap(rows, validation, phase_1.datasets or phase_1.dataset_json, phase_1.validation_json)
    if phase_2 is not None:   # before phase 1's model check: its run folder refusals need no model engine
        from .trainer import check_train
        if phase_2.deepspeed_config is None:   # what the workers read from accelerate's environment
            phase_2.deepspeed_config = deepspeed
        check_train(phase_2)
    phase_1.model.check(phase_1.family.encoder_components)
