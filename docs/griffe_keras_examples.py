"""Reads Keras-style `Example:` sections when the API reference is built.

keras-sp writes docstrings as Keras does: the doctest lines under
`Example:` start at the docstring's own indentation, after a blank line,

    Example:

    >>> keras_sp.regularize(model, "l2_sp", alpha=0.1)

whereas the Google style that mkdocstrings parses wants the lines of an
`Examples:` section right under its title and indented. This Griffe
extension rewrites each such block that way before the docstring is parsed,
so the reference shows the examples as code. The docstrings themselves, and
the doctests run from them, are unchanged.
"""

import re

import griffe

_EXAMPLE_TITLE = re.compile(r"^Examples?:\s*$")
_SECTION_TITLE = re.compile(r"^[A-Z][A-Za-z ]*:\s*$")


def indent_examples(text):
    """`text` with each example section in the Google layout."""
    lines = []
    in_example = False
    for line in text.splitlines():
        if _EXAMPLE_TITLE.match(line):
            in_example = True
            lines.append("Examples:")
        elif _SECTION_TITLE.match(line):
            in_example = False
            lines.append(line)
        elif not in_example:
            lines.append(line)
        elif line.strip():
            lines.append("    " + line)
        elif lines[-1] != "Examples:":
            lines.append("")
    return "\n".join(lines)


class KerasExamples(griffe.Extension):
    """Rewrites the Keras-style example sections of every docstring."""

    def on_instance(self, *, node, obj, agent, **kwargs):
        if obj.docstring is not None:
            obj.docstring.value = indent_examples(obj.docstring.value)
