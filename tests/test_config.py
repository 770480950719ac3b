"""Parameters: every value lives in one params file, validated strictly; nothing falls back to code."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from ncis.cli import main
from ncis.config import PROTOCOL_NEEDS, Params, load_params
from ncis.datasets import BENCHMARKS, get_benchmark
from ncis.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = [ROOT / "params.yaml", *sorted((ROOT / "configs").glob("*.yaml"))]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_validates_and_states_only_what_its_benchmark_uses(path):
    params = load_params(path)
    stated = yaml.safe_load(path.read_text())
    benchmark = get_benchmark(params.benchmark)
    flat, stated_flat = params.flat(), Params.model_validate(stated).flat()
    assert flat == stated_flat
    # A key a benchmark does not use is left out, not filled with a placeholder.
    unused = {key for key, value in flat.items() if value is None}
    assert not unused & set(benchmark.needs)


def _fields(model, prefix=""):
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _fields(annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", field


def test_the_code_states_no_value_only_types_bounds_and_descriptions():
    load_params(ROOT / "params.yaml")  # registers the benchmarks
    optional = {key for benchmark in BENCHMARKS.values() for key in benchmark.needs}
    optional |= {key for keys in PROTOCOL_NEEDS.values() for key in keys}
    for key, field in _fields(Params):
        if field.is_required():
            continue
        # The one default allowed: None for a key that only some benchmarks (or protocols) use and require.
        assert field.default is None and key in optional, f"{key} has a default in config.py"
    assert all(field.description for _, field in _fields(Params)), "every key is documented"


def test_a_missing_params_file_is_an_error_never_the_code_defaults(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # e.g. `ncis run` started outside the repository
    assert main(["run", "--no-tracking"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "params.yaml" in err and "--params" in err
    assert not any(tmp_path.iterdir())


def test_a_key_stated_twice_in_one_file_is_refused(tmp_path):
    text = (ROOT / "params.yaml").read_text()
    doubled = tmp_path / "params.yaml"
    doubled.write_text(text.replace("cvpn:\n", "cvpn:\n  lr: 1.0\n", 1))
    with pytest.raises(UserError, match="stated twice"):
        load_params(doubled)


def test_types_are_strict(tmp_path):
    with pytest.raises(UserError, match="cvpn.epochs"):
        load_params(ROOT / "params.yaml", ["cvpn.epochs=1.5"])  # a float where an int is meant
    with pytest.raises(UserError, match="embed.prompt"):
        load_params(ROOT / "params.yaml", ["embed.prompt=3"])
    assert load_params(ROOT / "params.yaml", ["cvpn.lr=1"]).cvpn.lr == 1.0  # an int is a valid float


def test_a_key_the_benchmark_needs_cannot_be_left_out():
    with pytest.raises(UserError, match="diffusion.train_steps: required by the digits benchmark"):
        load_params(ROOT / "params.yaml", ["diffusion.train_steps=null"])
    with pytest.raises(UserError, match="data.root: required by the cifar100 benchmark"):
        load_params(ROOT / "configs" / "cifar100.yaml", ["data.root=null"])


def test_phase_one_and_its_use_are_one_choice():
    """pretrain.epochs > 0 exactly when classifier.init starts from it: no phase 2 without its
    phase 1, no phase 1 that nothing starts from; imagenet100 alone ships both phases."""
    assert load_params(ROOT / "configs" / "imagenet100.yaml").classifier.init == "pretrain-classifier"
    assert all(load_params(p).pretrain.epochs == 0 for p in (ROOT / "params.yaml", ROOT / "configs" / "cifar100.yaml"))
    with pytest.raises(UserError, match="pretrain.epochs=0 skips"):
        load_params(ROOT / "configs" / "imagenet100.yaml", ["pretrain.epochs=0"])
    with pytest.raises(UserError, match="nothing starts from"):
        load_params(ROOT / "configs" / "imagenet100.yaml", ["classifier.init="])
    assert load_params(ROOT / "configs" / "imagenet100.yaml", ["pretrain.epochs=0", "classifier.init=models/x"]).classifier.init == "models/x"
