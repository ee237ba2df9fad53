"""Trials -> results: Tune's trial folders read as plain files, best checkpoints picked, exported and
evaluated once; paired tests and intervals."""
