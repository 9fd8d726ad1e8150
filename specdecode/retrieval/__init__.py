"""Retrieval drafting (REST, He et al. 2023): a datastore of token ids searched with the
sequence's last tokens; what followed the matches becomes the draft.

suffix_array.py  the sorted suffixes of one int32 token array, and the search over them
datastore.py     tokens + suffix array + tokenizer header, saved as one .npz
corpus.py        which files a datastore is built from (the CLI's paths, or the default corpus)
build.py         text -> token ids -> Datastore; the default datastore, built on demand
commands.py      `specdecode datastore build`
"""
