"""Presets ship inside the package and resolve by name or path from any directory."""

import glob
import json
import os
import tomllib
from importlib import resources

import pytest

from dllm_jax import presets
from dllm_jax.bench import ablation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPECTED = ("bench-small", "dream-7b", "engine-bench-small", "llada-8b")


def test_presets_are_package_data():
  root = resources.files("dllm_jax") / "configs"
  shipped = sorted(p.name for p in root.iterdir() if p.name.endswith(".json"))
  assert shipped == [n + ".json" for n in EXPECTED]
  assert presets.names() == EXPECTED
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as fh:
    patterns = tomllib.load(fh)["tool"]["setuptools"]["package-data"]["dllm_jax"]
  pkg = os.path.join(REPO, "dllm_jax")
  packaged = {os.path.relpath(f, pkg) for pat in patterns for f in glob.glob(os.path.join(pkg, pat))}
  assert {f"configs/{n}.json" for n in EXPECTED} <= packaged


def test_repository_configs_is_the_package_directory():
  assert os.path.samefile(os.path.join(REPO, "configs"), presets.preset_dir())


@pytest.mark.parametrize("ref", ["llada-8b", "llada-8b.json", "configs/llada-8b.json"])
def test_resolve_from_any_directory(ref, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  path = presets.resolve(ref)
  assert os.path.samefile(path, str(resources.files("dllm_jax") / "configs" / "llada-8b.json"))
  assert presets.is_preset(ref)
  assert presets.model_config(ref).num_params() == 8_015_581_184


def test_existing_paths_win_and_unknown_names_list_the_presets(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "configs").mkdir()
  own = tmp_path / "configs" / "llada-8b.json"
  d = json.load(open(presets.preset_path("dream-7b")))
  own.write_text(json.dumps(d))
  assert presets.resolve("configs/llada-8b.json") == "configs/llada-8b.json"
  assert not presets.is_preset("configs/llada-8b.json")
  assert presets.model_config("configs/llada-8b.json").family == "dream"
  with pytest.raises(FileNotFoundError, match="presets: bench-small, dream-7b"):
    presets.resolve("llada-9b")
  with pytest.raises(FileNotFoundError):
    presets.resolve("other/llada-8b.json")  # only the repository's configs/ spelling maps


def test_load_dict_drops_comments_and_model_dirs_work(tmp_path):
  eng = presets.load_dict("engine-bench-small")
  assert "_comment" not in eng and eng["memory_budget_bytes"] == 12 * 2**20
  d = tmp_path / "my-model"
  d.mkdir()
  (d / "config.json").write_text(open(presets.preset_path("dream-7b")).read())
  cfg = presets.model_config(str(d))
  assert cfg.num_params() == 7_615_616_512 and cfg.name == "my-model"
  assert presets.model_config(str(d / "config.json")).name == "my-model"


def test_ablation_defaults_are_presets():
  mcfg = ablation.load_model_config()
  assert mcfg.name == "bench-small" and mcfg.num_params() == 1_475_200
  assert ablation.load_engine_dict() == presets.load_dict("engine-bench-small")
