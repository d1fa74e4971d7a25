"""Recipes: ART, SPAR, QGen and LaPraDoR, each a pure train step plus what it needs."""
