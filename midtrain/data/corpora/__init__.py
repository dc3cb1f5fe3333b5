"""Domains from pretokenized files, read where they lie: Megatron ``.bin``/``.idx``, OLMo/Dolma
``.npy`` token memmaps and ``litdata.optimize`` chunks (local or in object storage).

``formats`` knows each format (its files, dtype, documents and bytes); ``split`` is the store's
view of one split of such a domain (``ExternalSplit``: spans of the files, read with one pread
each) and the check, at open, that the files are still the ones prepared
(``check_files``). ``midtrain.data.prepare.pretokenized`` builds the domain's index files.
"""

from midtrain.data.corpora.formats import FORMATS, Corpus, open_corpus, resolve_corpus_spec
from midtrain.data.corpora.split import ExternalSplit, check_files, file_records, scan_tokens

__all__ = [
    "FORMATS",
    "Corpus",
    "ExternalSplit",
    "check_files",
    "file_records",
    "open_corpus",
    "resolve_corpus_spec",
    "scan_tokens",
]
