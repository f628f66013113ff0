"""Tokenizer, chat template and incremental detokenizer.

* `Tokenizer` (``tokenizer.py``): plain-text encode (special-token strings stay text),
  decode, token bytes, special ids; built from a HF directory or a GGUF file.
* `ChatTemplate` (``chat_template.py``): sandboxed Jinja rendering whose message text never
  becomes control tokens (C17); folds mid-conversation system messages (C10).
* `IncrementalDetokenizer` (``detokenizer.py``): token ids -> text deltas that never split a
  UTF-8 character (C01) and hold back possible stop-string prefixes (C02,
  ``stop_strings.py``).
"""

from openmini.tokenizer.chat_messages import ChatTemplateError
from openmini.tokenizer.chat_template import DEFAULT_CHAT_TEMPLATE, ChatTemplate
from openmini.tokenizer.detokenizer import DetokenizerDelta, IncrementalDetokenizer
from openmini.tokenizer.stop_strings import StopStringMatcher
from openmini.tokenizer.tokenizer import Tokenizer

__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "ChatTemplate",
    "ChatTemplateError",
    "DetokenizerDelta",
    "IncrementalDetokenizer",
    "StopStringMatcher",
    "Tokenizer",
]
