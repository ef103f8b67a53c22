"""The model-family interface: the registry, and the refusals that keep one family's files away from another's.

A second family is stood in for by a registered copy of Qwen-Image-Edit under another name (same code, other
family name): enough to show that a cache, a LoRA or a switch of one family is refused by another.
"""

import ast
import json
import re
import shutil
from pathlib import Path

import pytest

from edittuner.errors import EditTunerError
from edittuner.families import FAMILIES, PRESETS, VERSIONS, Preset, family_of, model_spec
from edittuner.families.qwen_image_edit import QwenImageEdit

PACKAGE = Path(__file__).resolve().parent.parent / "edittuner"


class OtherFamily(QwenImageEdit):
    name = "other-edit"
    base_model_prefix = "Other-Edit-"


@pytest.fixture
def other_family(monkeypatch):
    """A registered second family with one version, "o1", that has no zero_cond_t switch."""
    family = OtherFamily()
    preset = Preset(family.name, "o1", "Other-Edit-o1", ("to_q",), 1, zero_cond_t=None)
    monkeypatch.setattr(OtherFamily, "presets", {"o1": preset})
    monkeypatch.setitem(FAMILIES, family.name, family)
    monkeypatch.setitem(PRESETS, "o1", preset)
    return family


def test_registry_versions_name_their_family():
    assert set(VERSIONS) == set(PRESETS) >= {"2508", "2509", "2511"}
    for name, preset in PRESETS.items():
        family = FAMILIES[preset.family]
        assert preset.name == name and family.presets[name] is preset and family_of(name) is family
        assert preset.base_model.startswith(family.base_model_prefix)
    assert model_spec("2511").zero_cond_t and not model_spec("2511", False).zero_cond_t
    with pytest.raises(EditTunerError, match=r"--model_version 2612: choose one of 2508, 2509, 2511"):
        family_of("2612")


def test_a_switch_the_family_lacks_is_refused(other_family):
    assert model_spec("o1").zero_cond_t is False
    with pytest.raises(EditTunerError, match=r"--zero_cond_t on: Other-Edit-o1 has no zero_cond_t; leave the flag out"):
        model_spec("o1", True)


def test_no_version_branches_outside_the_families():
    """The trainer, cache, sampling, app and CLI ask the family; none of them tests a version name."""
    version_literal = re.compile(r"""["'](2508|2509|2511)["']""")
    offenders = []
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and "model_version" in ast.unparse(node.left) and \
                    any(isinstance(c, ast.Constant) and isinstance(c.value, str) for c in node.comparators):
                offenders.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and \
                    version_literal.fullmatch(repr(node.value)):
                offenders.append(f"{path.name}:{node.lineno}: {node.value!r}")
    assert offenders == []


def test_another_familys_cache_is_refused(demo_cache, other_family, tmp_path):
    from edittuner.cache import CacheReader
    cache = tmp_path / "cache"
    shutil.copytree(demo_cache, cache)
    manifest = json.loads((cache / "manifest.json").read_text())
    (cache / "manifest.json").write_text(json.dumps({**manifest, "model_version": "o1"}))
    with pytest.raises(EditTunerError, match=r"was made for --model_version o1 \(Other-Edit-o1\), but this run trains "
                                             r"--model_version 2511 \(Qwen-Image-Edit-2511\), another model family"):
        CacheReader(cache, expected_model_version="2511")


def test_another_familys_lora_is_refused_by_the_editor(trained_run, other_family, resize, tmp_path):
    from edittuner.lora import read_lora_file, save_lora
    from edittuner.sampling import Editor
    state, metadata = read_lora_file(trained_run[0] / "lora.safetensors")
    assert (metadata["family"], metadata["base_model"]) == ("qwen-image-edit", "Qwen-Image-Edit-2511")
    other = tmp_path / "other.safetensors"
    save_lora(other, state, {**metadata, "base_model": "Other-Edit-o1", "family": "other-edit"})
    editor = Editor(resize=resize)
    with pytest.raises(EditTunerError, match=r"--lora .*other.safetensors was trained for Other-Edit-o1 \(the "
                                             r"other-edit family\), but the base model loaded is a qwen-image-edit "
                                             r"model; start with --model_version o1"):
        editor.set_lora(other)
    assert editor.lora.path is None and editor.model_version == "2511"   # nothing changed
