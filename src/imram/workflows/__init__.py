"""Workflows that combine the library into one job: ``prepare`` (pictures and captions into a
precomp folder), ``quickstart`` (the main job: prepare the Tux Paint stamps, train three
models, report them) and ``demo`` (score random features and check them against the reference).
Each is a library function that the command line calls."""
