"""Experiments that check the papers' claims on a model you can train yourself.

``python -m minidsv3.experiments ablations`` runs the ablations of the DeepSeek-V3 report
and of the auxiliary-loss-free balancing paper on the Shakespeare toy model, several
seeds each, and writes ``docs/results.md`` with the papers' own numbers beside ours.

* ``ablations.py`` -- which runs there are (``VARIANTS``), the sweep that trains them
  (resumable: finished runs are skipped, a killed one continues), and what each run's
  ``result.json`` holds, MaxVio as the balancing paper defines it included;
* ``report.py``    -- the results page: mean +- std over seeds, the findings with the
  papers' numbers and a verdict each, and the figures.
"""
