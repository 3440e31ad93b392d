"""Autotuning: problem buckets, the on-disk cache of winners, and (the autotuner issue) the search.

``buckets`` says which calls share a winner; ``cache`` finds the files and answers lookups for
the dispatcher.
"""
