"""Structured outputs: JSON schemas, ``json_object`` and tool calls enforced by a grammar.

* `llguidance_grammar`: ``StructuredOutputSpec`` -> grammar text, and tokenizer-free checks
  (the serving layer fails closed with a 400 before any engine work).
* `llguidance_backend`: compile against the tokenizer (cached by spec) and one
  `GrammarMatcher` per sequence: fill the token bitmask, accept tokens, say when finished.

The backend is the ``llguidance`` package (see docs/structured_outputs.md for the choice).
This package's ``__init__`` imports neither torch nor llguidance.
"""

from openmini.structured.errors import StructuredOutputError
from openmini.structured.llguidance_grammar import (
    check_json_schema,
    check_spec,
    check_tool,
    spec_to_lark,
)

__all__ = ["StructuredOutputError", "check_json_schema", "check_spec", "check_tool",
           "spec_to_lark"]
