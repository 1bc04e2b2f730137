"""One module per pipeline stage: its typed outputs and its ``run_*_stage`` (the table is
:mod:`safesteer.pipeline.table`)."""
