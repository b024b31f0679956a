"""HTML pages from Jinja2 templates (autoescaped): the logic builds data, the templates lay it out."""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def _env():
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    return Environment(loader=PackageLoader("medres", "templates"), autoescape=select_autoescape(["html"]), undefined=StrictUndefined, keep_trailing_newline=True)


def render(name: str, **context) -> str:
    return _env().get_template(name).render(**context)
