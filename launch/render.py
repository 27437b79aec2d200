"""Rendering a launch template: `--set key=value` texts -> checked values -> the file's text.

    text = render("k8s/train-indexed-job.yaml", {"image": "ghcr.io/me/lmlab:0.1", "pvc": "runs",
                                                  "num_processes": "4", "config": "configs/llama.py:small",
                                                  "workdir": "/shared/runs/small"})

Every value is checked before jinja2 sees it (`launch.values`): an unknown name, a missing
required value or a bad one is a `LaunchError` naming it. jinja2 runs with StrictUndefined, so
a template that reads a value its catalog entry does not declare fails too, by name, instead of
rendering an empty string. Templates quote what they insert: `q` (shlex.quote) in shell
scripts, `tojson` (a JSON string is a YAML string) in manifests.
"""

from __future__ import annotations

import difflib
import os
import shlex
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2

from launch import catalog
from launch.values import LaunchError

TEMPLATE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")


def _did_you_mean(name: str, known) -> str:
    """'did you mean X? ' for the known name closest to a misspelt one, or ''."""
    close = difflib.get_close_matches(name, known, n=1)
    return f"did you mean {close[0]}? " if close else ""


def find(path: str) -> catalog.Template:
    """The catalog entry of `path` (e.g. 'slurm/train.sbatch'), or LaunchError listing them."""
    if path not in catalog.TEMPLATES:
        raise LaunchError(f"no launch template {path!r}; {_did_you_mean(path, catalog.TEMPLATES)}templates: "
                          f"{', '.join(catalog.TEMPLATES)}")
    return catalog.TEMPLATES[path]


def parse_sets(pairs: Sequence[str]) -> dict[str, str]:
    """['key=value', ...] -> {key: value}; LaunchError for a pair without '=' or a key given twice."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise LaunchError(f"--set {pair!r} is not KEY=VALUE (e.g. --set nodes=4)")
        if key in out:
            raise LaunchError(f"--set {key}= is given twice ({out[key]!r} and {value!r}); give it once")
        out[key] = value
    return out


def check_values(template: catalog.Template, given: Mapping[str, str]) -> dict[str, Any]:
    """The template's values: given ones checked, defaults for the rest.

    Raises:
      LaunchError: an unknown name (with the closest known one), required values missing (all
        named), or a value its kind refuses.
    """
    names = [x.name for x in template.values]
    for key in given:
        if key not in names:
            raise LaunchError(f"{template.path} has no value {key!r}; {_did_you_mean(key, names)}its values: "
                              f"{', '.join(names)}")
    missing = [x.name for x in template.values if x.default is None and x.name not in given]
    if missing:
        sets = " ".join(f"--set {m}=..." for m in missing)
        raise LaunchError(f"{template.path} needs {', '.join(missing)}: add {sets}")
    values = {x.name: x.check(x.name, given.get(x.name, x.default)) for x in template.values}
    template.check(values)
    return values


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATE_DIR), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True,
                             autoescape=False)  # shell and YAML, not HTML: the templates quote (q, tojson)
    env.filters["q"] = lambda x: shlex.quote(str(x))
    return env


def render(path: str, given: Mapping[str, str]) -> str:
    """The text of template `path` with the values `given` (texts, as after --set).

    Raises:
      LaunchError: a bad template name or value (see `check_values`), or a value the template
        reads that its catalog entry lacks.
    """
    template = find(path)
    values = check_values(template, given)
    try:
        return _environment().get_template(path).render(**values)
    except jinja2.UndefinedError as e:
        raise LaunchError(f"{path} reads a value that is not set: {e.message}; add it to launch/catalog.py") from e
