"""Analysis of finished runs, from artefact folders alone (no Redis): shared by
``labctl compare`` and ``labctl report``.

    runs.py      resolve job ids, sweep ids and folder paths into loaded runs
    manifest.py  sweep ids and the sweep manifest ``<artifacts>/sweeps/<id>.json``
    grouping.py  blocks (settings held equal) and groups (the compared field) of runs
    stats.py     per-run figures, mean ± std, paired significance tests across seeds
    tables.py    the comparison table as aligned text or Markdown
    plotting.py  overlaid curves with std bands
    environment.py, speed.py, report_writer.py  the generated report
"""
