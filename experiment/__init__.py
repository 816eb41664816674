"""The experiment behind main.py: everything between the flags and the files, one module per concern.

    cli          flags (one per Config field) and their validation
    settings     what each stage reads of the configuration (a frozen slice of Config)
    stages       training and every measurement as pure functions of settings and inputs
    pipeline     starting a run (data, stage store), one seed's model and its stages, the pair and the centre
    sweep        the grid of recipes, one row per model, the rank statistics
    dynamics     --dynamics: the edge-of-stability runs, their dense tracking and their readings
    ranks        running across torchrun's processes
    outputs      metrics.json's schema (every kind of run) and the one writer of every file beside it
    report       the reports' words: sentences, thresholds, sections, text tables (plotting.py draws them)
    environment  the device and library versions a run records

The measurement library (utils.py over landscape/) imports nothing from here.
"""
