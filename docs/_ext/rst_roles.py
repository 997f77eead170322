"""A griffe extension for the API pages: Sphinx roles in docstrings become optional cross-references.

The package's docstrings are Google style but name other objects with Sphinx roles (``:class:`TokenSpheres```,
``:func:`~manifold_fm.solvers.integrate```), which Markdown would print literally. Each role is replaced by an
``<autoref ... optional>`` element: a link when the target is documented on some page, plain code otherwise (never a
build warning, since a docstring may legitimately name something private). Relative names are resolved in the
scope of the object whose docstring it is, as Sphinx would.
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|data|attr|obj|exc|const):`(?P<tilde>~?)(?P<target>[^`<>]+?)`")


def _identifier(obj: griffe.Object, target: str) -> str:
    """The full dotted path of ``target`` as seen from ``obj`` (``target`` itself when it cannot be resolved)."""
    head, _, rest = target.partition(".")
    if head == obj.package.name:
        return target
    scope = obj if obj.is_class else obj.parent
    if scope is not None and scope.is_class and head in scope.all_members:
        member = scope.all_members[head]  # also inherited members (aliases to where they are defined)
        base = getattr(member, "target_path", member.path)
        return f"{base}.{rest}" if rest else base
    try:
        base = obj.resolve(head)
    except Exception:  # griffe raises several error types for names it cannot see; any of them means "as written"
        return target
    return f"{base}.{rest}" if rest else base


def _render(obj: griffe.Object, match: re.Match[str]) -> str:
    target = match["target"].strip().removesuffix("()")
    shown = target.rsplit(".", 1)[-1] if match["tilde"] else target
    identifier = html.escape(_identifier(obj, target), quote=True)
    return f'<autoref identifier="{identifier}" optional><code>{html.escape(shown)}</code></autoref>'


class RstRoles(griffe.Extension):
    """Rewrite Sphinx roles in every docstring once the package is loaded (so names can be resolved)."""

    def on_object(self, *, obj: griffe.Object, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if obj.docstring is not None and ":" in obj.docstring.value:
            obj.docstring.value = _ROLE.sub(lambda m: _render(obj, m), obj.docstring.value)
