"""The interchangeable parts, one table per kind: name -> where its implementation lives.

ncis/config.py checks `classifier.arch` and `evaluate.score` against these tables without
importing the parts (torch, torchvision, and modules whose changes should not make DVC rerun
every stage); a stage resolves a name to its builder or class when it needs it. Adding a part:
write it, then add one line here.
"""

from __future__ import annotations

from importlib import import_module

# classifier.arch -> builder(channels) -> (backbone returning penultimate features, feature width)
ARCHITECTURES = {
    "resnet34": "ncis.classifiers:resnet34_cifar",
    "wrn40_2": "ncis.classifiers:wrn40_2",
    "small_cnn": "ncis.classifiers:small_cnn",
}

# evaluate.score -> ncis.scores.Scorer subclass (higher score = more in-distribution)
SCORES = {
    "energy": "ncis.scores:EnergyScorer",
    "msp": "ncis.scores:MSPScorer",
    "odin": "ncis.scores:OdinScorer",
    "mahalanobis": "ncis.scores:MahalanobisScorer",
    "knn": "ncis.scores:KNNScorer",
}


def check(table: dict[str, str], name: str, what: str) -> str:
    if name not in table:
        raise ValueError(f"unknown {what} {name!r}; choose one of {list(table)}")
    return name


def resolve(table: dict[str, str], name: str, what: str):
    """The builder or class registered under `name`."""
    module, attribute = table[check(table, name, what)].split(":")
    return getattr(import_module(module), attribute)
