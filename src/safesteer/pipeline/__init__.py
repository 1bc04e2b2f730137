"""`safesteer run`: the whole pipeline with stage caching and a report."""
