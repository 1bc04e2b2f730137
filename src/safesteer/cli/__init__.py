"""Thin command-line layer over safesteer's pure stage cores."""
