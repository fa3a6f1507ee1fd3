from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from builders import conv_bn_model
from click.testing import CliRunner

from onnxcomp import recipe
from onnxcomp.cli import PASS_FLAGS, main, optimize
from onnxcomp.passes import REGISTRY
from onnxcomp.passes.prune_channels import PruneConfig
from onnxcomp.recipe import RecipeError

RECIPE = """
[defaults]
seed = 3

[[pass]]
name = "canonicalize"

[[pass]]
name = "svd"
target-speedup = 2
exclude = ["a", "b"]

[[pass]]
name = "tucker"
rank = 0.5
"""


def _steps(text: str, base=None):
    import tomllib

    return recipe.parse(tomllib.loads(text)).steps(REGISTRY, base)


def test_parse_coerces_values_and_merges_defaults():
    steps = _steps(RECIPE, {"threads": 2})
    assert [s.name for s in steps] == ["canonicalize", "svd", "tucker"]
    svd = steps[1].config
    assert svd.rank == "auto" and svd.target_speedup == 2.0
    assert svd.exclude == ("a", "b") and svd.seed == 3 and svd.threads == 2
    assert steps[2].config.rank == 0.5 and steps[2].config.seed == 3


def test_rank_alias_of_kernel_sharing():
    steps = _steps('[[pass]]\nname = "kernel_sharing"\ngroups = 4\n')
    assert steps[0].config.rank == 4


@pytest.mark.parametrize("text, needle", [
    ('[[pass]]\nname = "nope"\n', "pass 1 (nope): unknown pass"),
    ('[[pass]]\nname = "svd"\nrank_multipl = 8\n',
     "unknown option 'rank_multipl' (did you mean 'rank-multiple'?)"),
    ('[[pass]]\nname = "svd"\ntarget-speedup = "fast"\n', "expected float"),
    ('[[pass]]\nname = "svd"\nrefit = 1\n', "expected bool"),
    ('[[pass]]\nname = "prune_channels"\nratio = 1.5\n', "--ratio must be in [0, 1)"),
    ('[defaults]\nrnak = 3\n[[pass]]\nname = "svd"\n', "no pass of the recipe has option 'rnak'"),
    ('[[pass]]\nrank = 3\n', 'pass 1: needs name = "<pass>"'),
    ('pass = []\n', "at least one [[pass]]"),
    ('version = 2\n[[pass]]\nname = "svd"\n', "version 2 is not supported"),
    ('[[passes]]\nname = "svd"\n', "unknown top-level key 'passes'"),
])
def test_bad_recipes_say_what_is_wrong(text, needle):
    with pytest.raises(RecipeError, match=None) as info:
        _steps(text)
    assert needle in str(info.value)


def test_dump_round_trips():
    steps = _steps(RECIPE)
    steps.append(recipe.Recipe((("prune_channels", {"ratio": 0.25}),)).steps(REGISTRY)[0])
    again = _steps(recipe.dump(steps))
    assert [(s.name, s.config) for s in again] == [(s.name, s.config) for s in steps]
    assert isinstance(again[3].config, PruneConfig)


def test_json_recipe_and_read_errors(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"pass": [{"name": "fold_bn"}]}))
    assert [s.name for s in recipe.load(path).steps(REGISTRY)] == ["fold_bn"]
    path.write_text("{not json")
    with pytest.raises(RecipeError, match="not valid JSON"):
        recipe.load(path)
    bad = tmp_path / "r.toml"
    bad.write_text("[[pass]\n")
    with pytest.raises(RecipeError, match="not valid TOML"):
        recipe.load(bad)
    with pytest.raises(RecipeError, match="cannot read recipe"):
        recipe.load(tmp_path / "missing.toml")


def test_every_pass_flag_is_known_to_the_recipe_check():
    run_level = {"model_path", "output", "passes", "recipe_path", "save_recipe", "report_path",
                 "bench", "provider", "threads", "runs", "latency_cache", "calib_path",
                 "num_calib", "calib_batch", "size", "mean", "std", "scale", "layout", "bgr",
                 "auto_mode", "heldout_path", "score_threshold", "metric_spec", "labels_path",
                 "jobs"}
    names = {p.name for p in optimize.params}
    assert names - run_level == PASS_FLAGS


# ------------------------------------------------------------------------------------- CLI


@pytest.fixture
def files(tmp_path):
    model = tmp_path / "in.onnx"
    onnx.save(conv_bn_model(c_out=16, size=16, batch="N"), model)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal([8, 3, 16, 16]).astype("f4"))
    return model, calib


def _invoke(args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_saved_recipe_reproduces_the_run(files, tmp_path):
    model, calib = files
    flags = ["--pass", "canonicalize", "--pass", "fold_bn", "--pass", "svd", "--rank", "0.5",
             "--no-latency-check"]
    first = _invoke(["optimize", model, "-o", tmp_path / "a.onnx", *flags, "--calib", calib,
                     "--no-bench", "--save-recipe", tmp_path / "r.toml",
                     "--report", tmp_path / "rep.json"])
    assert first.exit_code == 0, first.output
    text = (tmp_path / "r.toml").read_text()
    assert 'name = "svd"' in text and 'rank = 0.5' in text and "latency-check = false" in text
    second = _invoke(["optimize", model, "-o", tmp_path / "b.onnx", "--recipe",
                      tmp_path / "r.toml", "--calib", calib, "--no-bench"])
    assert second.exit_code == 0, second.output
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    doc = json.loads((tmp_path / "rep.json").read_text())
    assert doc["steps"][2]["config"]["rank"] == 0.5


@pytest.mark.parametrize("extra, needle", [
    (["--pass", "fold_bn"], "give one of --pass, --recipe and --auto"),
    (["--rank", "4"], "--rank: with --recipe, pass options belong in the recipe"),
])
def test_recipe_conflicts(files, tmp_path, extra, needle):
    model, _ = files
    path = tmp_path / "r.toml"
    path.write_text('[[pass]]\nname = "fold_bn"\n')
    result = _invoke(["optimize", model, "-o", tmp_path / "o.onnx", "--recipe", path, *extra])
    assert result.exit_code == 2 and needle in result.output
    assert not (tmp_path / "o.onnx").exists()


def test_bad_recipe_is_one_line_and_writes_nothing(files, tmp_path):
    model, _ = files
    path = tmp_path / "r.toml"
    path.write_text('[[pass]]\nname = "svd"\nrank-multipl = 8\n')
    result = _invoke(["optimize", model, "-o", tmp_path / "o.onnx", "--recipe", path])
    assert result.exit_code == 2
    assert "unknown option 'rank_multipl'" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o.onnx").exists()


def test_nothing_to_do(files, tmp_path):
    model, _ = files
    result = _invoke(["optimize", model, "-o", tmp_path / "o.onnx"])
    assert result.exit_code == 2 and "give --pass NAME" in result.output


def test_readme_recipe_is_valid():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("```toml", 1)[1].split("```", 1)[0]
    text = "\n".join(line.strip() for line in block.splitlines())
    steps = _steps(text)
    assert [s.name for s in steps] == ["canonicalize", "fold_bn", "cp", "quantize"]
    assert steps[2].config.target_speedup == 2.0 and steps[3].config.max_drop == 0.01


def test_latency_cache_is_run_level(tmp_path):
    """--latency-cache goes with --recipe, reaches the passes, and stays out of saved recipes."""
    from builders import conv_model

    w = np.random.default_rng(1).standard_normal([64, 64, 3, 3]).astype(np.float32)
    model = tmp_path / "big.onnx"
    onnx.save(conv_model(w, size=16, batch="N", pads=[1, 1, 1, 1]), model)
    calib = tmp_path / "big.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal([8, 64, 16, 16]).astype("f4"))
    cache = tmp_path / "lat.json"
    first = _invoke(["optimize", model, "-o", tmp_path / "a.onnx", "--pass", "svd",
                     "--min-realized", 0, "--calib", calib, "--no-bench", "--latency-cache",
                     cache, "--save-recipe", tmp_path / "r.toml"])
    assert first.exit_code == 0, first.output
    assert "latency" not in (tmp_path / "r.toml").read_text()
    assert cache.exists()
    second = _invoke(["optimize", model, "-o", tmp_path / "b.onnx", "--recipe",
                      tmp_path / "r.toml", "--calib", calib, "--no-bench", "--latency-cache",
                      cache, "--report", tmp_path / "rep.json"])
    assert second.exit_code == 0, second.output
    doc = json.loads((tmp_path / "rep.json").read_text())
    stats = doc["steps"][0]["report"]["metrics"]["latency_cache"]
    assert stats["hits"] > 0 and stats["file"] == str(cache)
